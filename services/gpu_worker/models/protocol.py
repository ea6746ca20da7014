"""The decoder-layer protocol: what the engine's paths rely on in a model, whatever its family.

The flat forward (``CausalLM.forward``), the pipelined offload path (``pipeline.py`` and
``stage_graphs.py``, which run a layer in two halves around an attention they place themselves),
the profiler (``profiler.dense_part``, the two halves without attention), CUDA graphs (they replay
``forward``) and tensor parallelism (the loader hands each rank its slice of the Hugging Face
tensors; a layer all-reduces its row-parallel outputs) see a model only through these members. A
family (``neo_gpu_worker.models``) is any pair of classes that provides them.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch

from neo_common.geometry import ModelGeometry
from neo_common.tensor_parallel import Shard
from neo_gpu_worker.attention import AttentionMetadata
from neo_gpu_worker.rope import RotaryEmbedding


@runtime_checkable
class DecoderLayer(Protocol):
    """One decoder layer, in the two halves the pipeline runs apart.

    - ``attn_scale``: the factor on q.k scores (``head_dim ** -0.5`` unless the family says
      otherwise, e.g. Gemma-2's ``query_pre_attn_scalar``).
    - ``attn_softcap``: ``c`` of ``c * tanh(score / c)`` on the scaled scores, 0 for none; an
      attention path that cannot apply it must refuse the model (the pipeline's CPU kernel does).
    """

    attn_scale: float
    attn_softcap: float

    def pre_attn(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                 store: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual stream ``x [T, hidden]`` -> q ``[T, Hq, D]``, k and v ``[T, Hkv, D]``, RoPE
        applied; with ``store`` = (kv_layer, slot_mapping) k and v are also written to their slots."""

    def post_attn(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual stream and attention output ``[T, Hq, D]`` -> the next layer's residual stream
        (all-reduced over tensor-parallel ranks inside)."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                kv_layer: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """``post_attn(x, paged_attention(pre_attn(x)))`` over the layer's KV pool."""


@runtime_checkable
class CausalLM(Protocol):
    """A decoder stack with its embedding, final norm and LM head.

    - ``geometry``: this rank's shapes (its heads and MLP width); ``full_geometry`` the model's;
      ``shard`` which slice this rank holds.
    - ``layers``: the ``DecoderLayer`` s; ``rope`` the rotary tables every layer shares (set by
      ``setup_rope`` once the model is on its device).
    """

    geometry: ModelGeometry
    full_geometry: ModelGeometry
    shard: Shard
    layers: Sequence[DecoderLayer]
    rope: RotaryEmbedding | None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[T]`` -> the first residual stream ``[T, hidden]``."""

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm of the last residual stream."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[N, hidden]`` -> float32 logits ``[N, vocab]``."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states (after ``norm``) of every token of the flat batch."""

    def setup_rope(self, max_positions: int, device: torch.device) -> None: ...

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hugging Face-named tensors in; every parameter must be covered, every tensor placed."""

    def init_random(self, seed: int) -> None:
        """Random weights of the right scale (``--load-format dummy``)."""
