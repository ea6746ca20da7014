"""`neo bench` against a real replica: a small rate sweep completes and writes its JSON and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
