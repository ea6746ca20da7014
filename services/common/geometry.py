"""Model geometry: the shapes every process agrees on (no weights, no torch).

The gateway sizes block pools from it, the GPU worker builds layers from it, the CPU attention
process lays out its KV pool from it, and the operator sizes pods from it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Architecture(str, enum.Enum):
    """The Hugging Face ``architectures`` names the engine serves (GGUF ``general.architecture``
    values map onto them: ``GGUF_ARCHITECTURES``)."""

    LLAMA = "LlamaForCausalLM"
    MISTRAL = "MistralForCausalLM"
    QWEN2 = "Qwen2ForCausalLM"
    QWEN3 = "Qwen3ForCausalLM"
    GEMMA2 = "Gemma2ForCausalLM"


# Gemma-2 GGUFs are left out: llama.cpp stores its norms as 1 + weight and derives the attention
# scale from the model size rather than a stored query_pre_attn_scalar.
GGUF_ARCHITECTURES = {"llama": Architecture.LLAMA, "mistral": Architecture.MISTRAL, "qwen2": Architecture.QWEN2,
                      "qwen3": Architecture.QWEN3}


class Quantization(str, enum.Enum):
    """How the dense layers' weights are held: at the compute dtype, or FP8 (float8_e4m3fn with a
    float32 scale per output channel; ``neo_gpu_worker.fp8``)."""

    NONE = "none"
    FP8 = "fp8"


# Bytes a dense weight element takes under each quantization (None: the compute dtype's), and the
# bytes of its per-output-channel scale.
_DENSE_BYTES = {Quantization.NONE: None, Quantization.FP8: 1}
_SCALE_BYTES = {Quantization.NONE: 0, Quantization.FP8: 4}


class Activation(str, enum.Enum):
    """MLP gate activations: SwiGLU's SiLU, GeGLU's tanh-approximated GELU (Gemma)."""

    SILU = "silu"
    GELU_TANH = "gelu_pytorch_tanh"


@dataclasses.dataclass(frozen=True)
class ModelGeometry:
    """Shapes of a decoder of one of the supported architectures (``ARCHITECTURES``).

    - ``architecture``: the Hugging Face ``architectures[0]`` name; it picks the decoder family in
      the GPU worker's registry (``neo_gpu_worker.models``).
    - ``rope_scaling``: the Llama-3.1 style dict (rope_type llama3, factor, low/high_freq_factor,
      original_max_position_embeddings), linear, or ``freq_factors`` (a GGUF's ``rope_freqs``:
      per-pair divisors of the inverse frequencies, key ``factors``); None for plain RoPE.
    - ``qk_norm``: RMSNorm over each head's q and k before RoPE (Qwen3).
    - ``max_position_embeddings``: the longest context the engine serves: the trained length,
      capped at ``sliding_window`` when the model has one (``model_source.serving_context``).
    - ``sliding_window``: the window of windowed attention layers (None: every layer global).
      Within it a windowed layer sees every earlier token, so every layer runs global attention
      and no kernel needs a window argument.
    - ``hidden_act``: the MLP's gate activation (``Activation``).
    - ``query_pre_attn_scalar``: attention scale is its inverse square root (None: ``head_dim``).
    - ``attn_logit_softcapping`` / ``final_logit_softcapping``: ``c * tanh(x / c)`` on attention
      scores / output logits (None: off; Gemma-2).
    - ``quantization``: how the dense layers (q/k/v/o, gate/up/down) hold their weights
      (``Quantization``): an FP8 checkpoint's, or ``--quantization fp8``; embeddings, norms and the
      LM head stay at the compute dtype. ``weight_bytes`` counts it.
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
    architecture: str = "LlamaForCausalLM"
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    quantization: str = Quantization.NONE.value

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: {self.num_heads} query heads not a multiple of {self.num_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: head_dim must be even for RoPE")
        if self.hidden_act not in {a.value for a in Activation}:
            raise ValueError(f"{self.name}: activation {self.hidden_act!r} is not supported "
                             f"({', '.join(a.value for a in Activation)})")
        if self.quantization not in {q.value for q in Quantization}:
            raise ValueError(f"{self.name}: quantization {self.quantization!r} is not supported "
                             f"({', '.join(q.value for q in Quantization)})")

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    # -- derived sizes ------------------------------------------------------------------------
    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def kv_bytes_per_block(self, block_size: int, dtype_bytes: int) -> int:
        return block_size * self.kv_bytes_per_token(dtype_bytes)

    def dense_parameters(self) -> int:
        """Weights of the dense layers (q/k/v/o, gate/up/down) over all layers: what FP8 holds in a byte."""
        h = self.hidden_size
        qkv_o = 2 * h * self.num_heads * self.head_dim + 2 * h * self.num_kv_heads * self.head_dim
        return self.num_layers * (qkv_o + 3 * h * self.intermediate_size)

    def dense_output_channels(self) -> int:
        """Output rows of the dense layers over all layers (one FP8 scale each)."""
        h, inter = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.num_layers * (q + 2 * kv + h + 2 * inter + h)

    def num_parameters(self) -> int:
        h = self.hidden_size
        norms = 4 * h if self.architecture == Architecture.GEMMA2 else 2 * h   # Gemma-2: pre and post norms
        per_layer = norms + (2 * self.head_dim if self.qk_norm else 0)
        if self.qkv_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * per_layer + self.dense_parameters() + embed + lm_head + h

    def weight_bytes(self, dtype_bytes: int) -> int:
        """Bytes of the weights at compute dtype ``dtype_bytes`` (FP8 dense layers: one byte per
        weight plus a float32 scale per output channel)."""
        quant = Quantization(self.quantization)
        dense = self.dense_parameters()
        per_dense = _DENSE_BYTES[quant] or dtype_bytes
        return ((self.num_parameters() - dense) * dtype_bytes + dense * per_dense
                + self.dense_output_channels() * _SCALE_BYTES[quant])

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
        # Served within its 4096-token sliding window (see model_source.serving_context).
        ModelGeometry("mistral-7b-v0.1", 4096, 32, 32, 8, 128, 14336, 32000, 4096, bos_token_id=1,
                      eos_token_ids=(2,), architecture=Architecture.MISTRAL.value, sliding_window=4096),
        ModelGeometry("qwen2.5-7b", 3584, 28, 28, 4, 128, 18944, 152064, 32768, rope_theta=1000000.0,
                      rms_norm_eps=1e-6, qkv_bias=True, bos_token_id=151643, eos_token_ids=(151645, 151643),
                      architecture=Architecture.QWEN2.value),
        ModelGeometry("qwen3-8b", 4096, 36, 32, 8, 128, 12288, 151936, 40960, rope_theta=1000000.0,
                      rms_norm_eps=1e-6, bos_token_id=151643, eos_token_ids=(151645, 151643),
                      architecture=Architecture.QWEN3.value, qk_norm=True),
        ModelGeometry("gemma-2-9b", 3584, 42, 16, 8, 256, 14336, 256000, 4096, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, bos_token_id=2, eos_token_ids=(1, 107),
                      architecture=Architecture.GEMMA2.value, sliding_window=4096,
                      hidden_act=Activation.GELU_TANH.value, query_pre_attn_scalar=256.0,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    )
}


def lookup(name: str) -> ModelGeometry:
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise KeyError(f"unknown geometry {name!r}; known: {', '.join(sorted(GEOMETRIES))}") from None
