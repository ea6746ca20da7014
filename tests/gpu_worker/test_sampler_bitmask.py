"""The grammar bitmask of structured outputs in the device sampler, on CPU tensors: masked tokens
are never sampled (greedy or drawn, whatever the bias), allowed logits are untouched, rows without
a mask are untouched; the packed layout is llguidance's (the gateway's masks unpack to the same
tokens); the plan's columns are checked on decoding and renumbered to the sampled rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neo_common.protocol import IterationPlan, ProtocolError, decode
from neo_gpu_worker.model_runner import _sampled_bitmask
from neo_gpu_worker.sampler import SamplingBatch, apply_token_bitmask, sample

V = 100   # not a multiple of 32: the last word is partly beyond the vocabulary


def pack(allowed: np.ndarray) -> np.ndarray:
    """[rows, V] bool -> [rows, ceil(V/32)] int32, bit t % 32 of word t // 32 (little-endian bits)."""
    words = (allowed.shape[1] + 31) // 32
    padded = np.zeros((allowed.shape[0], words * 32), bool)
    padded[:, :allowed.shape[1]] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


def batch(temps, seeds, bitmask=None, bias=None):
    n = len(temps)
    return SamplingBatch.from_columns(
        np.array(temps, np.float32), np.ones(n, np.float32), np.full(n, -1, np.int32), np.array(seeds, np.int64),
        np.zeros(n, np.int32), V, torch.device("cpu"), None,
        None if bias is None else tuple(np.array(c) for c in zip(*bias)), None, None, bitmask)


def test_masked_logits_become_minus_infinity_and_the_rest_stay():
    rng = np.random.default_rng(0)
    logits = torch.randn(4, V)
    allowed = rng.random((2, V)) < 0.3
    allowed[1, 31] = allowed[1, 63] = True   # the sign bit of a word
    rows = torch.tensor([0, 2])
    out = apply_token_bitmask(logits, rows, torch.from_numpy(pack(allowed)))
    for j, r in enumerate([0, 2]):
        keep = torch.from_numpy(allowed[j])
        assert torch.equal(out[r][keep], logits[r][keep])
        assert torch.all(out[r][~keep] == float("-inf"))
    assert torch.equal(out[1], logits[1]) and torch.equal(out[3], logits[3]), "rows without a mask are untouched"
    assert not torch.isinf(logits).any(), "out of place: the caller's logits are the model's"


def test_tokens_beyond_the_masks_words_are_not_allowed():
    logits = torch.zeros(1, V)
    short = pack(np.ones((1, 64), bool))   # two words: tokens 64.. have no bit
    out = apply_token_bitmask(logits, torch.tensor([0]), torch.from_numpy(short))
    assert torch.all(out[0, :64] == 0) and torch.all(out[0, 64:] == float("-inf"))


def test_greedy_and_drawn_tokens_stay_inside_the_mask_whatever_the_bias():
    torch.manual_seed(1)
    logits = torch.randn(3, V) * 4
    allowed = np.zeros((2, V), bool)
    allowed[0, [5, 17, 40, 99]] = True
    allowed[1, [2, 3]] = True
    best = int(logits[0].argmax())
    bias = [(0, best, 100.0), (1, 50, 100.0)]   # a huge bias on a banned token cannot bring it back
    for seed in range(50):
        params = batch([0.0, 1.5, 1.0], [seed, seed, seed], (np.array([0, 1]), pack(allowed), np.array([0, 1])), bias)
        out = sample(logits, params).tolist()
        assert out[0] in {5, 17, 40, 99} and out[0] == [5, 17, 40, 99][int(logits[0, [5, 17, 40, 99]].argmax())]
        assert out[1] in {2, 3}
    free = {sample(logits, batch([0.0, 1.5, 1.0], [s] * 3, (np.array([0, 1]), pack(allowed), np.array([0, 1])))).tolist()[2]
            for s in range(30)}
    assert len(free) > 2, "the unmasked row keeps sampling from the whole vocabulary"


def test_a_mask_of_one_token_forces_it():
    allowed = np.zeros((1, V), bool)
    allowed[0, 77] = True
    logits = torch.randn(2, V)
    out = sample(logits, batch([1.0, 0.0], [3, 3], (np.array([1]), pack(allowed), np.array([0])))).tolist()
    assert out[1] == 77


def test_the_gateways_masks_unpack_to_the_tokens_the_grammar_allows():
    """llguidance fills the masks the gateway sends; the sampler must read its layout the same way."""
    from neo_common.model_source import embedded_gguf_path
    from neo_gateway.structured_output import StructuredOutputManager, fill_bitmasks, spec_from_fields, unpack_bitmask
    from neo_gateway.tokenizer import TextTokenizer

    tok = TextTokenizer.from_gguf(embedded_gguf_path())
    vocab = tok.vocab_size + 7   # a model vocabulary padded past the tokenizer's
    manager = StructuredOutputManager(tok, vocab)
    reqs = [manager.request_for(spec_from_fields({"guided_regex": "[0-9]+"})),
            manager.request_for(spec_from_fields({"guided_choice": ["yes", "no"]}))]
    masks = fill_bitmasks(reqs)
    allowed = unpack_bitmask(masks, vocab)
    assert not allowed[:, tok.vocab_size:].any(), "ids the tokenizer lacks are never allowed"
    for row, want in ((0, lambda s: s.isdigit()), (1, lambda s: "yes".startswith(s) or "no".startswith(s))):
        ids = np.flatnonzero(allowed[row])
        assert len(ids) and all(want(tok.decode([int(i)])) for i in ids)
    logits = torch.zeros(2, vocab)
    out = apply_token_bitmask(logits, torch.tensor([0, 1]), torch.from_numpy(masks))
    assert torch.equal(torch.isfinite(out), torch.from_numpy(allowed))


def plan(sample_rows, bitmask_rows, words=4):
    n = len(sample_rows)
    return IterationPlan(seq_ids=np.arange(n, dtype=np.int64), sample=np.array(sample_rows, np.uint8),
                         num_tokens=np.ones(n, np.int32), bitmask_rows=np.array(bitmask_rows, np.int32),
                         bitmask=np.full((len(bitmask_rows), words), -1, np.int32))


def test_rows_in_one_state_share_one_mask_that_is_expanded_on_the_device():
    """The gateway sends the distinct masks and an index (``distinct_rows``); sampling under them
    equals sampling under one mask per row."""
    from neo_gateway.structured_output import distinct_rows

    rng = np.random.default_rng(3)
    allowed = rng.random((2, V)) < 0.2
    per_row = pack(allowed[[0, 1, 0, 0]])            # rows 0, 2, 3 in one state
    masks, index = distinct_rows(per_row)
    assert masks.shape[0] == 2 and index.tolist() == [0, 1, 0, 0]
    p = plan([1, 1, 1, 1], [0, 1, 2, 3], words=per_row.shape[1])
    p.bitmask, p.bitmask_index = masks, index
    decoded = decode(p.encode())
    rows, words, idx = _sampled_bitmask(decoded, np.arange(4), (decoded.bitmask, decoded.bitmask_index))
    logits = torch.randn(4, V) * 3
    shared = sample(logits, batch([0.0] * 4, [1] * 4, (rows, words, idx)))
    one_each = sample(logits, batch([0.0] * 4, [1] * 4, (rows, per_row, np.arange(4))))
    assert torch.equal(shared, one_each)
    assert all(allowed[[0, 1, 0, 0][r], int(t)] for r, t in enumerate(shared))
    for bad_index in (np.array([0, 1, 0], np.int32), np.array([0, 2, 0, 0], np.int32), np.array([0, 0, 0, 0], np.int32)):
        p.bitmask_index = bad_index   # one short; beyond the masks; a mask no row uses
        with pytest.raises(ProtocolError):
            decode(p.encode())


def test_the_plan_carries_masks_only_for_sampling_rows():
    p = plan([1, 0, 1, 1], [2, 0])
    decoded = decode(p.encode())
    assert np.array_equal(decoded.bitmask_rows, [2, 0]) and decoded.bitmask.shape == (2, 4)
    rows, masks, index = _sampled_bitmask(decoded, np.flatnonzero(decoded.sample),
                                          (decoded.bitmask, decoded.bitmask_index))
    assert rows.tolist() == [1, 0], "plan rows 2 and 0 are the 2nd and 1st sampled rows"
    assert index.tolist() == [0, 1], "no index: one mask per row"
    for bad in (plan([1, 0], [1]), plan([1, 1], [0, 0]), plan([1, 1], [2])):
        with pytest.raises(ProtocolError):
            decode(bad.encode())
    wrong_width = plan([1], [0])
    wrong_width.bitmask = np.zeros((2, 4), np.int32)
    with pytest.raises(ProtocolError):
        decode(wrong_width.encode())
