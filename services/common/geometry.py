"""Model geometry: the shapes every process agrees on (no weights, no torch).

The gateway sizes block pools from it, the GPU worker builds layers from it, the CPU attention
process lays out its KV pool from it, and the operator sizes pods from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelGeometry:
    """Shapes of a LLaMA-family decoder.

    rope_scaling holds the Llama-3.1 style dict (rope_type llama3, factor, low/high_freq_factor,
    original_max_position_embeddings) or None.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: {self.num_heads} query heads not a multiple of {self.num_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: head_dim must be even for RoPE")

    # -- derived sizes ------------------------------------------------------------------------
    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def kv_bytes_per_block(self, block_size: int, dtype_bytes: int) -> int:
        return block_size * self.kv_bytes_per_token(dtype_bytes)

    def num_parameters(self) -> int:
        h, inter = self.hidden_size, self.intermediate_size
        q = h * self.num_heads * self.head_dim
        kv = 2 * h * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * h
        per_layer = q + kv + o + 3 * h * inter + 2 * h
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * per_layer + embed + lm_head + h

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.num_parameters() * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelGeometry":
        data = dict(data)
        data["eos_token_ids"] = tuple(data.get("eos_token_ids") or ())
        return cls(**data)


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Real geometries for `--load-format dummy` and for sizing.
GEOMETRIES: dict[str, ModelGeometry] = {
    g.name: g
    for g in (
        ModelGeometry("smollm2-135m", 576, 30, 9, 3, 64, 1536, 49152, 8192, rope_theta=100000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
        ModelGeometry("llama-2-7b", 4096, 32, 32, 32, 128, 11008, 32000, 4096,
                      bos_token_id=1, eos_token_ids=(2,)),
        ModelGeometry("llama-3-8b", 4096, 32, 32, 8, 128, 14336, 128256, 8192, rope_theta=500000.0,
                      bos_token_id=128000, eos_token_ids=(128001, 128009)),
        ModelGeometry("llama-3.1-8b", 4096, 32, 32, 8, 128, 14336, 128256, 131072, rope_theta=500000.0,
                      rope_scaling=_LLAMA3_SCALING, bos_token_id=128000, eos_token_ids=(128001, 128009)),
        ModelGeometry("llama-3-70b", 8192, 80, 64, 8, 128, 28672, 128256, 8192, rope_theta=500000.0,
                      bos_token_id=128000, eos_token_ids=(128001, 128009)),
    )
}


def lookup(name: str) -> ModelGeometry:
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise KeyError(f"unknown geometry {name!r}; known: {', '.join(sorted(GEOMETRIES))}") from None
