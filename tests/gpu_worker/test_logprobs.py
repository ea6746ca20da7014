"""Logprobs on the device against a plain reference on the same logits (log-softmax in float64,
ranks and top-k by sorting), independent of the batch; and through a ModelRunner: the sampled
token's logprob and top-k are the raw model's (not the biased, tempered distribution it was drawn
from), a placeholder row's too (async scheduling), prompt logprobs of chunked prefills equal the
log-softmax of every prompt position's logits, and rows that do not ask get nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neo_common.model_source import ModelSource, embedded_gguf_path
from neo_common.protocol import PLACEHOLDER_TOKEN
from neo_gpu_worker.logprobs import flat_positions, reduce

V = 50


def reference(row: list[float], chosen: int, k: int):
    """(logprob, rank, top ids, top logprobs) computed plainly."""
    top = max(row)
    norm = top + math.log(sum(math.exp(x - top) for x in row))
    lp = [x - norm for x in row]
    order = sorted(range(len(row)), key=lambda t: -lp[t])[:k]
    return lp[chosen], 1 + sum(v > lp[chosen] for v in lp), order, [lp[t] for t in order]


def test_reduce_equals_the_reference_and_does_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, V, generator=gen) * 4
    chosen = torch.tensor([0, 7, 49, 3, 3, 21])
    got = reduce(torch.log_softmax(logits, -1), chosen, 5)
    for i in range(6):
        lp, rank, ids, values = reference(logits[i].double().tolist(), int(chosen[i]), 5)
        assert got.logprob[i].item() == pytest.approx(lp, abs=1e-5)
        assert got.rank[i].item() == rank
        assert got.top_ids[i].tolist() == ids
        assert got.top_values[i].tolist() == pytest.approx(values, abs=1e-5)
    alone = reduce(torch.log_softmax(logits[2:3], -1), chosen[2:3], 5)
    for a, b in zip((alone.logprob, alone.rank, alone.top_ids, alone.top_values),
                    (got.logprob, got.rank, got.top_ids, got.top_values)):
        assert torch.equal(a[0], b[2])


def test_k_zero_gives_the_chosen_tokens_alone():
    got = reduce(torch.log_softmax(torch.randn(2, V), -1), torch.tensor([1, 2]), 0)
    assert got.top_ids.shape == (2, 0) and got.logprob.shape == (2,)


def test_flat_positions_of_rows_in_a_flat_batch():
    # rows of 3, 5 and 2 tokens: offsets 0, 3, 8
    offsets = np.array([0, 3, 8])
    assert flat_positions(offsets, np.array([1, 2]), np.array([1, 0]), np.array([3, 2])).tolist() == [4, 5, 6, 8, 9]


@pytest.fixture(scope="module")
def runner():
    from support.equivalence import runner_for

    return runner_for(ModelSource("gguf", embedded_gguf_path(), "smollm2"), 256)


PROMPT = [504, 3458, 282, 4649, 314, 260, 1345, 282, 9063, 30]


def all_logits(runner, tokens: list[int]) -> torch.Tensor:
    """Every position's logits of one whole prefill (the reference for prompt logprobs)."""
    from neo_gpu_worker.batch import build_sub_batch
    from support.equivalence import BLOCK, make_plan

    plan = make_plan([(0, 0, tokens, list(range(-(-len(tokens) // BLOCK))))])
    sb = build_sub_batch(plan, np.arange(1), BLOCK, torch.device("cpu"), 0)
    with torch.inference_mode():
        return runner.model.compute_logits(runner.model(sb.input_ids, sb.positions, runner.kv_cache, sb.meta))


def test_a_runner_returns_raw_logprobs_of_the_sampled_token_also_for_a_placeholder_row(runner):
    """Row 1 samples a token forced by a bias at temperature 2; its logprob is still the raw
    model's. Row 0 does not ask and gets nothing. The next, launched-ahead decode of row 1 (a
    placeholder token) returns the raw logprobs of the position after the forced token."""
    from support.equivalence import BLOCK, make_plan

    x = 1400
    other = [1, 2, 3, 4]
    first = make_plan([(7, 0, other, [60]), (1, 0, PROMPT, [40])])
    first.temperature = np.array([0.0, 2.0], np.float32)
    first.bias_rows, first.bias_ids, first.bias_values = (np.array([1], np.int32), np.array([x], np.int32),
                                                          np.array([100.0], np.float32))
    first.logprobs = np.array([-1, 3], np.int8)
    got = runner.launch(first)
    second = make_plan([(1, len(PROMPT), [PLACEHOLDER_TOKEN], [40])])
    second.logprobs = np.array([2], np.int8)
    ahead = runner.launch(second)   # queued behind the first, fed from its device token
    res, res2 = got.finish(), ahead.finish()
    assert res.token_ids.tolist()[1] == x and res.lp_seq_ids.tolist() == [1]
    want = torch.log_softmax(all_logits(runner, PROMPT)[-1].double(), -1)
    assert res.lp_logprob[0] == pytest.approx(float(want[x]), abs=1e-4)
    assert res.lp_rank[0] == 1 + int((want > want[x]).sum())
    assert res.lp_top_ids[0].tolist() == want.topk(3).indices.tolist()
    assert res.lp_top_values[0] == pytest.approx(want.topk(3).values.tolist(), abs=1e-4)
    nxt = torch.log_softmax(all_logits(runner, PROMPT + [x])[-1].double(), -1)
    t = int(res2.token_ids[0])
    assert res2.lp_seq_ids.tolist() == [1] and res2.lp_logprob[0] == pytest.approx(float(nxt[t]), abs=1e-4)
    assert res2.lp_top_ids[0].tolist() == nxt.topk(2).indices.tolist()
    del BLOCK


def test_prompt_logprobs_of_chunked_prefills(runner):
    """The prompt in chunks of 4 (beside a row that does not ask): each chunk returns the logprobs
    of the prompt tokens that follow its positions, the last chunk's last position excluded (that
    one samples). Together they equal the log-softmax of a whole prefill's logits."""
    from support.equivalence import make_plan

    want = torch.log_softmax(all_logits(runner, PROMPT).double(), -1)
    got_lp, got_top = [], []
    for start in range(0, len(PROMPT), 4):
        chunk = PROMPT[start:start + 4]
        end = start + len(chunk)
        plan = make_plan([(9, 0, [5, 6, 7], [70]), (3, start, chunk, [50])])
        plan.sample = np.array([1, end == len(PROMPT)], np.uint8)
        count = min(end, len(PROMPT) - 1) - start
        plan.plp_rows, plan.plp_first = np.array([1], np.int32), np.array([0], np.int32)
        plan.plp_count, plan.plp_k = np.array([count], np.int32), np.array([2], np.int8)
        plan.plp_targets = np.array(PROMPT[start + 1:start + 1 + count], np.int32)
        res = runner.execute(plan)
        assert res.plp_seq_ids.tolist() == [3] and res.plp_count.tolist() == [count]
        assert not len(res.lp_seq_ids)
        got_lp += res.plp_logprob.tolist()
        got_top += res.plp_top_ids.tolist()
    assert len(got_lp) == len(PROMPT) - 1
    ref = [float(want[p, PROMPT[p + 1]]) for p in range(len(PROMPT) - 1)]
    assert got_lp == pytest.approx(ref, abs=1e-4)
    assert got_top == [want[p].topk(2).indices.tolist() for p in range(len(PROMPT) - 1)]
