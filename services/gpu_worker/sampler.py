"""Token sampling on the device: the grammar bitmask of structured outputs, logit bias, greedy,
temperature, min-p, top-k, top-p, and per-request seeds (vLLM's order: the grammar's mask first,
bias before the greedy argmax; min-p on the tempered probabilities before top-k/top-p).

Sampling uses the exponential-race form of the Gumbel-max trick: ``argmax(p / E)`` with
``E ~ Exp(1)`` draws from ``p``. The noise of a seeded request comes from its own generator seeded
with ``(seed, step)``, so its tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, step) pairs over generator seeds


@dataclasses.dataclass
class SamplingBatch:
    """Per-row sampling parameters of the rows that sample this iteration.

    Device tensors feed the math; the host-side flags decide which steps run at all, so sampling
    never waits on the device to find out (no host sync per step).
    """

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seeds: np.ndarray
    steps: np.ndarray
    any_random: bool
    any_filter: bool
    min_p: torch.Tensor | None = None                                   # None: no row uses it
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, token ids, values)
    penalties: torch.Tensor | None = None                               # [B, 3]: presence, frequency, repetition
    history: "PenaltyHistory | None" = None
    bitmask: tuple[torch.Tensor, torch.Tensor] | None = None            # (rows, [R, words] int32): grammar masks

    @classmethod
    def from_columns(cls, temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray, seeds: np.ndarray,
                     steps: np.ndarray, vocab: int, device: torch.device, min_p: np.ndarray | None = None,
                     bias: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                     penalties: np.ndarray | None = None,
                     history: "PenaltyHistory | None" = None,
                     bitmask: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> "SamplingBatch":
        """``bias``: (row, token id, value) entries, rows indexing these columns, one per (row, token);
        ``penalties`` ([B, 3], or None) apply over ``history``; ``bitmask``: (rows a grammar
        constrains, distinct packed int32 masks, each row's index among them), the masks expanded
        on the device (the distinct ones are all that cross to it)."""
        random_rows = temperature > 0
        filters = random_rows & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0))
        # a copy: columns of a decoded frame are read-only views of its buffer (torch warns on those)
        dev = lambda a, dtype: torch.from_numpy(np.array(a, dtype)).to(device, non_blocking=True)  # noqa: E731
        use_min_p = min_p is not None and bool((random_rows & (min_p > 0)).any())
        if bias is not None and len(bias[0]) and int(np.max(bias[1])) >= vocab:
            raise ValueError(f"logit_bias names token {int(np.max(bias[1]))}, beyond the vocabulary ({vocab})")
        return cls(
            temperature=dev(temperature, np.float32), top_p=dev(top_p, np.float32), top_k=dev(top_k, np.int64),
            seeds=seeds, steps=steps, any_random=bool(random_rows.any()), any_filter=bool(filters.any()),
            min_p=dev(min_p, np.float32) if use_min_p else None,
            bias=(dev(bias[0], np.int64), dev(bias[1], np.int64), dev(bias[2], np.float32))
            if bias is not None and len(bias[0]) else None,
            penalties=dev(penalties, np.float32) if penalties is not None and len(penalties) else None,
            history=history,
            bitmask=(dev(bitmask[0], np.int64), dev(bitmask[1], np.int32)[dev(bitmask[2], np.int64)])
            if bitmask is not None and len(bitmask[0]) else None)


@dataclasses.dataclass
class PenaltyHistory:
    """The tokens penalties look at, per sampled row, on the device: ``output`` (row, token) pairs
    of generated tokens (one per occurrence), ``prompt`` pairs (repetition penalty only), and
    ``placeholder``: (rows, tokens) generated last iteration, known only on the device."""

    output: tuple[torch.Tensor, torch.Tensor]
    prompt: tuple[torch.Tensor, torch.Tensor]
    placeholder: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_columns(cls, rows: np.ndarray, ids: np.ndarray, is_output: np.ndarray, device: torch.device,
                     placeholder: tuple[torch.Tensor, torch.Tensor] | None = None) -> "PenaltyHistory":
        # split on the host: a boolean mask on the device would need a sync to size its result
        dev = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.int64)).to(device, non_blocking=True)  # noqa: E731
        out = is_output.astype(bool)
        return cls((dev(rows[out]), dev(ids[out])), (dev(rows[~out]), dev(ids[~out])), placeholder)


def sample(logits: torch.Tensor, params: SamplingBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] (int64)."""
    if params.bitmask is not None:
        logits = apply_token_bitmask(logits, *params.bitmask)
    if params.bias is not None:   # out of place: the caller's logits stay as the model made them
        rows, ids, values = params.bias
        logits = logits.index_put((rows, ids), values.to(logits.dtype), accumulate=True)
    if params.penalties is not None:
        logits = _penalized(logits, params.penalties, params.history)
    greedy = logits.argmax(dim=-1)
    if not params.any_random:
        return greedy
    random_rows = params.temperature > 0
    t = torch.where(random_rows, params.temperature, torch.ones_like(params.temperature))
    logits = logits / t.unsqueeze(1)
    if params.min_p is not None:
        # vLLM's min-p: drop tokens whose probability is below min_p times the row's largest (rows
        # with min_p 0 keep everything); the later filters and the draw see only the survivors
        probs = torch.softmax(logits, dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * params.min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    probs = _filtered_probs(logits, params.top_p, params.top_k) if params.any_filter else torch.softmax(logits, -1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row in np.flatnonzero(params.seeds >= 0):
        seed = (int(params.seeds[row]) * _MIX + int(params.steps[row])) % (1 << 63)
        gen = torch.Generator(device=logits.device).manual_seed(seed)
        noise[row].exponential_(generator=gen)
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(random_rows, drawn, greedy)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Out of place: ``logits`` with the tokens each of ``rows`` may not sample at -inf. ``bitmask``
    is ``[R, words]`` int32, bit ``t % 32`` of word ``t // 32`` set where token ``t`` is allowed;
    tokens beyond the mask's words are not allowed. All on the device: no host sync."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1).to(torch.bool)   # [R, words * 32]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    masked = logits[rows].masked_fill(~allowed[:, :vocab], float("-inf"))
    return logits.index_put((rows,), masked)


def _penalized(logits: torch.Tensor, penalties: torch.Tensor, history: PenaltyHistory | None) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt and output tokens, then frequency (x count) and
    presence over output tokens. Counts are exact integers in float32, whatever the order of the
    accumulation, so a row's result does not depend on its batch."""
    counts = torch.zeros_like(logits)
    in_prompt = torch.zeros_like(logits, dtype=torch.bool)
    if history is not None:
        rows, ids = history.output
        counts.index_put_((rows, ids), torch.ones_like(rows, dtype=logits.dtype), accumulate=True)
        if history.placeholder is not None:
            rows, ids = history.placeholder
            counts.index_put_((rows, ids), torch.ones_like(rows, dtype=logits.dtype), accumulate=True)
        rows, ids = history.prompt
        in_prompt.index_put_((rows, ids), torch.ones_like(rows, dtype=torch.bool))
    presence, frequency, repetition = penalties.unbind(dim=1)
    in_output = counts > 0
    rep = repetition.unsqueeze(1)
    logits = torch.where(in_prompt | in_output, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * in_output.to(logits.dtype)


def _filtered_probs(logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    use_k = (top_k > 0) & (top_k < vocab)
    use_p = top_p < 1.0
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(use_k, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before >= top_p.unsqueeze(1)) & use_p.unsqueeze(1)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)
