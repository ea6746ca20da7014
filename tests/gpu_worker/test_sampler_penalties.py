"""Presence, frequency and repetition penalties in the device sampler against a plain reference on
the same logits; batch-invariant; and through a ModelRunner, where a placeholder row's last token
(known only on the device, async scheduling) counts as generated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neo_common.model_source import ModelSource, embedded_gguf_path
from neo_common.protocol import PLACEHOLDER_TOKEN
from neo_gpu_worker.sampler import PenaltyHistory, SamplingBatch, _penalized, sample

V = 40


def reference(row: torch.Tensor, prompt: list[int], output: list[int], pres: float, freq: float, rep: float):
    """vLLM's formulas, one token at a time."""
    out = row.clone()
    for t in range(V):
        if t in prompt or t in output:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        n = output.count(t)
        out[t] -= freq * n + (pres if n else 0.0)
    return out


def history(entries, placeholder=None):
    rows, ids, is_out = (np.array(c) for c in zip(*entries)) if entries else (np.zeros(0, np.int64),) * 3
    return PenaltyHistory.from_columns(rows, ids, is_out, torch.device("cpu"), placeholder)


def greedy_batch(n, penalties, hist):
    return SamplingBatch.from_columns(np.zeros(n, np.float32), np.ones(n, np.float32), np.full(n, -1, np.int32),
                                      np.full(n, -1, np.int64), np.zeros(n, np.int32), V, torch.device("cpu"),
                                      penalties=np.array(penalties, np.float32), history=hist)


CASES = [  # (prompt, output, presence, frequency, repetition)
    ([1, 2, 3], [4, 4, 5], 0.5, 0.3, 1.0),
    ([6, 7], [7, 8, 8, 8], 0.0, 0.0, 1.7),
    ([9], [10, 11, 10], -1.0, 0.8, 0.6),
    ([12, 13], [], 0.0, 0.0, 1.0),        # no penalty: untouched
]


def test_penalized_logits_equal_the_reference_and_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(len(CASES), V) * 4
    entries = [(r, t, 1) for r, c in enumerate(CASES) for t in c[1]]
    entries += [(r, t, 0) for r, c in enumerate(CASES) if c[4] != 1.0 for t in c[0]]
    penalties = [[c[2], c[3], c[4]] for c in CASES]
    got = _penalized(logits, torch.tensor(penalties), history(entries))
    for r, (prompt, output, pres, freq, rep) in enumerate(CASES):
        want = reference(logits[r], prompt if rep != 1.0 else [], output, pres, freq, rep)
        assert torch.allclose(got[r], want, atol=1e-6), r
        alone = [(0, t, o) for (rr, t, o) in entries if rr == r]
        assert torch.equal(_penalized(logits[r:r + 1], torch.tensor([penalties[r]]), history(alone))[0], got[r])
    assert torch.equal(got[3], logits[3])
    tokens = sample(logits, greedy_batch(len(CASES), penalties, history(entries)))
    assert tokens.tolist() == got.argmax(dim=-1).tolist(), "greedy rows pick from the penalized logits"


def test_a_placeholder_token_counts_as_generated():
    torch.manual_seed(1)
    logits = torch.randn(2, V)
    full = history([(0, 4, 1), (0, 7, 1), (1, 3, 1)])
    held = history([(0, 4, 1), (1, 3, 1)], placeholder=(torch.tensor([0]), torch.tensor([7])))
    pen = torch.tensor([[0.4, 0.6, 1.3], [0.0, 1.0, 1.0]])
    assert torch.equal(_penalized(logits, pen, full), _penalized(logits, pen, held))


@pytest.fixture(scope="module")
def runner():
    from support.equivalence import runner_for

    return runner_for(ModelSource("gguf", embedded_gguf_path(), "smollm2"), 256)


def test_a_runner_penalizes_the_placeholder_token_of_a_launched_ahead_row(runner):
    """Prefill samples X (forced by a bias); the next decode row feeds X as a placeholder. A bias
    makes X the greedy choice there by 2; presence + frequency penalties of 2 each must take it
    away, which happens only if the worker counts the placeholder X as generated."""
    from support.equivalence import BLOCK, last_logits, make_plan

    prompt = [504, 3458, 282, 4649, 314, 260, 1345, 282]
    x = 1400
    table = list(range(40, 40 + -(-(len(prompt) + 2) // BLOCK)))
    first = make_plan([(1, 0, prompt, table)])
    first.bias_rows, first.bias_ids, first.bias_values = (np.array([0], np.int32), np.array([x], np.int32),
                                                          np.array([100.0], np.float32))
    assert runner.execute(first).token_ids.tolist() == [x]
    nxt = last_logits(runner, prompt + [x])
    lead = float(nxt.max() - nxt[x]) + 2.0    # X wins by 2 with this bias, loses by 2 after the penalties
    second = make_plan([(1, len(prompt), [PLACEHOLDER_TOKEN], table)])
    second.bias_rows, second.bias_ids, second.bias_values = (np.array([0], np.int32), np.array([x], np.int32),
                                                             np.array([lead], np.float32))
    second.penalties = np.array([[2.0, 2.0, 1.0]], np.float32)   # history: nothing before the placeholder
    second.hist_rows, second.hist_ids, second.hist_output = (np.zeros(0, np.int32),) * 2 + (np.zeros(0, np.uint8),)
    got = runner.execute(second).token_ids.tolist()
    assert got == [int(nxt.argmax())] and got != [x]
