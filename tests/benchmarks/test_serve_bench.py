"""`neo bench` against a real replica: a small rate sweep completes and writes its JSON and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neo_bench.multiturn import make_conversations
from neo_bench.serve import arrival_gaps, main, parse_args, sample_lengths

pytestmark = pytest.mark.integration


def test_paper_workload_lengths_and_poisson_gaps():
    rng = np.random.default_rng(0)
    lengths = sample_lengths(parse_args(["--model", "m", "--workload", "paper-a", "--num-prompts", "500"]), rng)
    ins, outs = zip(*lengths)
    assert 900 <= min(ins) and max(ins) <= 1100 and 45 <= min(outs) and max(outs) <= 440
    gaps = arrival_gaps(4.0, 1.0, 20000, rng)
    assert abs(gaps.mean() - 0.25) < 0.01 and abs(gaps.std() - 0.25) < 0.02, "Poisson: mean = std = 1/rate"
    assert not arrival_gaps(float("inf"), 1.0, 5, rng).any()


def test_bench_sweep_against_a_real_replica(small_pool_replica, tmp_path):
    code = main(["--url", small_pool_replica.url, "--model", "smollm2-135m-instruct", "--num-prompts", "6",
                 "--rates", "inf,4", "--input-len", "8", "--output-len", "3", "--vocab", "49152",
                 "--goodput", "ttft:60000,tpot:60000", "--label", "ci", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "bench_ci.json").read_text())
    assert [r["rate"] for r in result["runs"]] == [float("inf"), 4.0]
    for run in result["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0
        assert run["output_throughput"] > 0 and run["goodput"] == pytest.approx(run["request_throughput"])
        assert run["ttft_s"]["p99"] >= run["ttft_s"]["p50"] > 0 and run["tpot_s"]["p50"] > 0
    assert (tmp_path / "bench_ci.png").stat().st_size > 1000


def test_multiturn_scripts_are_seeded_and_lengths_follow_their_distribution():
    args = parse_args(["--model", "m", "--workload", "multiturn", "--num-conversations", "200", "--num-turns", "3",
                       "--system-prompt-len", "5", "--user-len", "20", "--user-len-dist", "exponential",
                       "--answer-len", "10", "--answer-len-dist", "fixed", "--think-time", "0.5", "--rates", "2"])
    system, convs = make_conversations(args, 2.0, seed=7)
    assert len(system) == 5 and (system, convs) == make_conversations(args, 2.0, seed=7)
    assert make_conversations(args, 2.0, seed=8)[0] != system, "a new seed, a new system prompt"
    users = [len(u) for c in convs for u in c.users]
    assert 1 <= min(users) and max(users) <= 160 and 17 < np.mean(users) < 23
    assert all(c.answer_lens == [10, 10, 10] and c.think_s[0] == 0 and len(c.think_s) == 3 for c in convs)
    assert 0.4 < np.mean([t for c in convs for t in c.think_s[1:]]) < 0.6
    assert 0.4 < np.mean([c.gap_s for c in convs]) < 0.6, "Poisson arrivals of 2 conversations/s"
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--workload", "multiturn", "--num-turns", "0"])


def test_multiturn_resends_each_conversation_and_later_turns_hit_the_prefix_cache(small_pool_replica, tmp_path):
    """3 conversations x 3 turns; a system prompt of two blocks, user turns and answers of one block each."""
    system, user, answer, convs, turns = 32, 16, 16, 3, 3
    code = main(["--url", small_pool_replica.url, "--model", "smollm2-135m-instruct", "--workload", "multiturn",
                 "--num-conversations", str(convs), "--num-turns", str(turns), "--system-prompt-len", str(system),
                 "--user-len", str(user), "--user-len-dist", "fixed", "--answer-len", str(answer),
                 "--answer-len-dist", "fixed", "--think-time", "0.05", "--rates", "inf", "--vocab", "49152",
                 "--label", "mt", "--out", str(tmp_path)])
    assert code == 0
    (run,) = json.loads((tmp_path / "bench_mt.json").read_text())["runs"]
    assert run["completed"] == run["turns_expected"] == convs * turns and run["failed"] == 0
    for key in ("ttft_first_turn_s", "ttft_later_turns_s", "tpot_s"):
        assert run[key]["p99"] >= run[key]["p50"] > 0, key
    assert run["output_throughput"] > 0 and run["total_token_throughput"] > run["output_throughput"]
    # every turn resends the conversation: the previous prompt, the model's answer, the new user turn
    for c in range(convs):
        mine = [t for t in run["turns"] if t["conversation"] == c]
        assert [t["turn"] for t in mine] == list(range(turns)) and all(t["tokens"] == answer for t in mine)
        assert [t["prompt_tokens"] for t in mine] == [system + user + k * (user + answer) for k in range(turns)]
    cache = run["prefix_cache"]
    assert set(cache) >= {"queried_tokens", "hit_tokens_gpu", "hit_tokens_host", "demoted_bytes", "promoted_bytes",
                          "hit_rate", "host_blocks_after"}
    # a turn that sent only the system prompt and its user turn could find at most the system prompt
    assert cache["hit_tokens_gpu"] > convs * turns * system, cache
    assert 0 < cache["hit_rate"]["gpu"] <= 1 and cache["hit_tokens_host"] == 0, "the replica has no host tier"
    assert (tmp_path / "bench_mt.png").stat().st_size > 1000
