"""Rotary position embedding tables, including Llama-3.1 ``rope_scaling`` (rope_type llama3, or a
GGUF's ``rope_freqs`` per-pair divisors)."""

from __future__ import annotations

import math
from typing import Any

import torch

from neo_gpu_worker import ops


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per-pair inverse frequencies (float64 for exactness), scaled as the model's config asks."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "freq_factors":  # a GGUF's rope_freqs tensor: llama.cpp divides pair i's frequency by factor i
        return inv / torch.tensor(scaling["factors"], dtype=torch.float64)
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, freq_factors)")
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept; the band between is blended.
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding:
    """cos/sin tables for positions [0, max_positions), applied in the HF rotate-half layout."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, device: torch.device) -> None:
        inv = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=device, dtype=torch.float32)
        self.sin = emb.sin().to(device=device, dtype=torch.float32)
        self.max_positions = max_positions

    def apply(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
              store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D] in the input dtype (rotated in place on the Triton path);
        ``store`` = (kv_layer, slot_mapping, v) also writes k and v to the KV cache (``ops.rope``)."""
        return ops.rope(positions, q, k, self.cos, self.sin, store)
