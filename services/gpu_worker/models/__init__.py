"""The model registry: the Hugging Face ``architectures`` name picks the decoder family.

Llama, Mistral, Qwen2 and Qwen3 share ``model.LlamaModel`` (their differences are geometry flags:
QKV bias, q/k norm); Gemma-2 has its own layer (``gemma2.py``). Every family implements
``protocol.CausalLM``. ``neo_common.geometry.Architecture`` lists the names the geometry readers
accept; this table must cover exactly those (a test holds them equal).
"""

from __future__ import annotations

from neo_common.geometry import Architecture, ModelGeometry
from neo_common.settings import ConfigError
from neo_gpu_worker.model import LlamaModel
from neo_gpu_worker.models.gemma2 import Gemma2Model

REGISTRY: dict[Architecture, type[LlamaModel]] = {
    Architecture.LLAMA: LlamaModel,
    Architecture.MISTRAL: LlamaModel,
    Architecture.QWEN2: LlamaModel,
    Architecture.QWEN3: LlamaModel,
    Architecture.GEMMA2: Gemma2Model,
}


def supported() -> list[str]:
    return [a.value for a in REGISTRY]


def model_class(g: ModelGeometry) -> type[LlamaModel]:
    """The family class of ``g``; a ``ConfigError`` names an architecture outside the registry."""
    try:
        return REGISTRY[Architecture(g.architecture)]
    except (KeyError, ValueError):
        raise ConfigError(f"--model {g.name!r}: architecture {g.architecture!r} is not supported; "
                          f"supported: {', '.join(supported())}") from None


def cpu_attention_supports(g: ModelGeometry) -> bool:
    """Whether the cpu_attention process computes this model's attention: its kernel applies the
    default ``head_dim ** -0.5`` scale and no soft-capping."""
    return not g.attn_logit_softcapping and g.attn_scale == g.head_dim ** -0.5
