"""Gemma-2: the family that differs from Llama in structure, not only in shapes.

Per layer: a norm after attention and around the MLP as well as before attention ("sandwich"
norms), GeGLU (``gelu_pytorch_tanh``) instead of SwiGLU; the embedding is scaled by
``sqrt(hidden_size)``; RMSNorm multiplies by ``1 + weight`` (stored here as ``1 + weight`` at load,
so the shared norm kernel runs unchanged); attention scores are scaled by
``query_pre_attn_scalar ** -0.5`` and soft-capped, and so are the output logits. Every other layer
uses a sliding window: the engine serves at most ``sliding_window`` tokens of context
(``model_source`` caps the geometry's context length), where a windowed layer sees everything a
global one does.
"""

from __future__ import annotations

import torch

from neo_common.geometry import ModelGeometry
from neo_gpu_worker.model import DecoderLayer, LlamaModel, RMSNorm, _apply
from neo_gpu_worker.parallel import TensorParallel


class Gemma2DecoderLayer(DecoderLayer):
    """A Llama layer plus ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``, with
    ``post_attention_layernorm`` applied to the attention output before the residual add."""

    def __init__(self, g: ModelGeometry, tp: TensorParallel | None = None) -> None:
        super().__init__(g, tp)
        self.pre_feedforward_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)

    def post_attn(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        o = _apply(self.self_attn.o_proj, attn.reshape(-1, self.self_attn.q_size))
        o = self.post_attention_layernorm(o if self.tp is None else self.tp.all_reduce(o))
        h, x = self.pre_feedforward_layernorm(o, x)   # x + o, and its norm, in one pass
        return x + self.post_feedforward_layernorm(self.mlp(h))


class Gemma2Model(LlamaModel):
    """``Gemma2ForCausalLM`` (tied embeddings; ``final_logit_softcapping`` on the logits)."""

    layer_class = Gemma2DecoderLayer
    _norm_init = 0.0   # checkpoints hold weight where the norm multiplies by 1 + weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # the normalizer rounded to the activations' dtype first, as the reference implementation does
        return x * torch.tensor(self.geometry.hidden_size ** 0.5, dtype=x.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.geometry.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap

    def _convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float() + 1.0 if name.endswith("norm.weight") else tensor

    def _layer_norm_names(self) -> tuple[str, ...]:
        return super()._layer_norm_names() + ("pre_feedforward_layernorm", "post_feedforward_layernorm")
