"""logit_bias and min_p in the device sampler, against a plain reference on the same logits (and the
same seeded noise), batch-invariant; and through the plan's columns (ModelRunner's row mapping)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neo_common.protocol import IterationPlan, ProtocolError
from neo_gpu_worker.model_runner import _sampled_bias
from neo_gpu_worker.sampler import _MIX, SamplingBatch, sample

V = 64


def batch(temps, seeds, steps, min_p=None, bias=None):
    n = len(temps)
    return SamplingBatch.from_columns(
        np.array(temps, np.float32), np.ones(n, np.float32), np.full(n, -1, np.int32), np.array(seeds, np.int64),
        np.array(steps, np.int32), V, torch.device("cpu"),
        None if min_p is None else np.array(min_p, np.float32),
        None if bias is None else tuple(np.array(c) for c in zip(*bias)))


def reference(logits: torch.Tensor, temp: float, seed: int, step: int, min_p: float, bias: dict[int, float]) -> int:
    """One row, plainly: add the bias; greedy at temperature 0; else drop tokens below min_p x the
    top probability and draw with the row's seeded exponential noise (the sampler's Gumbel race)."""
    row = logits.clone()
    for t, v in bias.items():
        row[t] += v
    if temp == 0:
        return int(row.argmax())
    probs = torch.softmax(row / temp, dim=-1)
    probs = torch.where(probs < probs.max() * min_p, torch.zeros_like(probs), probs)
    gen = torch.Generator().manual_seed((seed * _MIX + step) % (1 << 63))
    noise = torch.empty(V).exponential_(generator=gen)
    return int((probs / probs.sum() / noise).argmax())


def test_bias_and_min_p_equal_the_reference_and_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    temps, seeds, steps = [0.0, 1.0, 0.7, 1.3], [5, 6, 7, 8], [0, 3, 1, 9]
    min_p = [0.0, 0.2, 0.0, 0.5]
    bias = {0: {int(logits[0].argmin()): 100.0}, 1: {3: -100.0, 4: 7.5}, 3: {10: 2.0}}
    entries = [(r, t, v) for r, d in bias.items() for t, v in d.items()]
    out = sample(logits, batch(temps, seeds, steps, min_p, entries)).tolist()
    want = [reference(logits[r], temps[r], seeds[r], steps[r], min_p[r], bias.get(r, {})) for r in range(4)]
    assert out == want
    assert out[0] == int(logits[0].argmin()), "a +100 bias makes a greedy row pick that token"
    for r in range(4):   # each row alone: the same token
        alone = [(0, t, v) for t, v in bias.get(r, {}).items()] or None
        assert sample(logits[r:r + 1], batch([temps[r]], [seeds[r]], [steps[r]], [min_p[r]], alone)).tolist() == [out[r]]


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4)]))
    drawn = {int(sample(logits, batch([1.0], [s], [0], [0.4]))[0]) for s in range(300)}
    assert drawn == {0, 1}, "min_p=0.4 keeps p >= 0.2: tokens 0 (0.5) and 1 (0.3)"
    assert {int(sample(logits, batch([1.0], [s], [0], [0.0]))[0]) for s in range(300)} >= {0, 1, 2}


def test_the_callers_logits_are_left_as_they_were():
    logits = torch.randn(2, V)
    before = logits.clone()
    sample(logits, batch([0.0, 1.0], [1, 2], [0, 0], [0.0, 0.3], [(0, 1, 50.0), (1, 2, -50.0)]))
    assert torch.equal(logits, before)


def test_plan_bias_columns_follow_the_sampled_rows():
    plan = IterationPlan(seq_ids=np.arange(4, dtype=np.int64), bias_rows=np.array([0, 1, 3, 3], np.int32),
                         bias_ids=np.array([5, 6, 7, 8], np.int32), bias_values=np.array([1, 2, 3, 4], np.float32))
    rows, ids, values = _sampled_bias(plan, np.array([1, 3]))   # rows 0 and 2 do not sample this iteration
    assert rows.tolist() == [0, 1, 1] and ids.tolist() == [6, 7, 8] and values.tolist() == [2, 3, 4]


@pytest.mark.parametrize("fields", [
    {"bias_rows": np.array([4], np.int32), "bias_ids": np.array([1], np.int32), "bias_values": np.ones(1, np.float32)},
    {"bias_rows": np.array([0], np.int32), "bias_ids": np.array([-1], np.int32), "bias_values": np.ones(1, np.float32)},
    {"bias_rows": np.array([0], np.int32), "bias_ids": np.array([1, 2], np.int32), "bias_values": np.ones(1, np.float32)},
    {"min_p": np.zeros(3, np.float32)}])
def test_malformed_bias_or_min_p_columns_are_an_unreadable_plan(fields):
    plan = IterationPlan(seq_ids=np.arange(4, dtype=np.int64), **fields)
    with pytest.raises(ProtocolError):
        IterationPlan._decode_body(__import__("msgpack").unpackb(plan.encode()[1:], raw=False))
