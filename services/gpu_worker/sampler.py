"""Token sampling on the device: greedy, temperature, top-k, top-p, and per-request seeds.

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

    @classmethod
    def from_columns(cls, temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray, seeds: np.ndarray,
                     steps: np.ndarray, vocab: int, device: torch.device) -> "SamplingBatch":
        random_rows = temperature > 0
        filters = random_rows & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0))
        return cls(
            temperature=torch.from_numpy(np.ascontiguousarray(temperature, np.float32)).to(device, non_blocking=True),
            top_p=torch.from_numpy(np.ascontiguousarray(top_p, np.float32)).to(device, non_blocking=True),
            top_k=torch.from_numpy(np.ascontiguousarray(top_k, np.int64)).to(device, non_blocking=True),
            seeds=seeds, steps=steps, any_random=bool(random_rows.any()), any_filter=bool(filters.any()))


def sample(logits: torch.Tensor, params: SamplingBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] (int64)."""
    greedy = logits.argmax(dim=-1)
    if not params.any_random:
        return greedy
    random_rows = params.temperature > 0
    t = torch.where(random_rows, params.temperature, torch.ones_like(params.temperature))
    logits = logits / t.unsqueeze(1)
    probs = _filtered_probs(logits, params.top_p, params.top_k) if params.any_filter else torch.softmax(logits, -1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row in np.flatnonzero(params.seeds >= 0):
        seed = (int(params.seeds[row]) * _MIX + int(params.steps[row])) % (1 << 63)
        gen = torch.Generator(device=logits.device).manual_seed(seed)
        noise[row].exponential_(generator=gen)
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(random_rows, drawn, greedy)


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
