"""The LLaMA-shaped decoder over a paged KV cache, and the building blocks other families reuse.

``LlamaModel`` serves Llama 2/3/3.1/3.2 (and SmolLM2), Mistral (the same shapes), Qwen2/2.5 (QKV
bias) and Qwen3 (RMSNorm over each head's q and k, no bias): the differences are geometry flags
(``qkv_bias``, ``qk_norm``). Families whose layer differs in structure subclass it
(``models/gemma2.py``); ``neo_gpu_worker.models`` maps architectures to classes, and
``models/protocol.py`` states what the engine relies on.

Weights arrive as Hugging Face names (whatever the file format) and are fused on load: q/k/v into
one ``qkv_proj`` and gate/up into one ``gate_up_proj``, so a layer runs four matmuls. A tensor that
carries GGUF blocks (the loader's, on the CPU device in float32) leaves its dense layer as a
``quant_dense.QuantLinear`` over the blocks (fused layers stack their parts' block rows); the
embedding looks rows up in its blocks, and a tied one's blocks are the LM head (``tied_head``). Under tensor
parallelism (``neo_common.tensor_parallel``) the model is built from the rank's local geometry, the
loader keeps the rank's slice of each full tensor, and the O-projection and MLP outputs are
all-reduced over the ranks.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch
from torch import nn

from neo_common.geometry import Activation, ModelGeometry
from neo_common.model_source import Fp8Checkpoint
from neo_common.settings import ConfigError
from neo_common.tensor_parallel import Shard
from neo_gpu_worker import ops
from neo_gpu_worker.dense import dense
from neo_gpu_worker.fp8 import FP8_TYPES, Fp8Linear
from neo_gpu_worker.fp8_weights import fp8_stream
from neo_gpu_worker.quant_dense import QuantBlocks, QuantEmbedding, QuantLinear, isa_name
from neo_gpu_worker.attention import AttentionMetadata, paged_attention
from neo_gpu_worker.parallel import TensorParallel
from neo_gpu_worker.rope import RotaryEmbedding

log = logging.getLogger(__name__)


def _apply(layer: nn.Linear | Fp8Linear | QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """A dense layer: ``dense`` over an ``nn.Linear``; an FP8 one (``fp8.py``) or one over GGUF
    blocks (``quant_dense.py``) through its own forward."""
    if isinstance(layer, nn.Linear):
        return dense(x, layer.weight, layer.bias)
    return layer(x)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``: ``(norm(residual + x), residual + x)`` in one pass."""
        out, summed = ops.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, summed)


class Attention(nn.Module):
    """Fused QKV and O projections; ``q_norm``/``k_norm`` (Qwen3) normalise each head before RoPE.
    ``scale`` and ``softcap`` (0: none) are what the attention call applies to the scores."""

    def __init__(self, g: ModelGeometry) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = g.num_heads, g.num_kv_heads, g.head_dim
        self.q_size = g.num_heads * g.head_dim
        self.kv_size = g.num_kv_heads * g.head_dim
        self.qkv_proj = nn.Linear(g.hidden_size, self.q_size + 2 * self.kv_size, bias=g.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, g.hidden_size, bias=False)
        self.q_norm = RMSNorm(g.head_dim, g.rms_norm_eps) if g.qk_norm else None
        self.k_norm = RMSNorm(g.head_dim, g.rms_norm_eps) if g.qk_norm else None
        self.scale = g.attn_scale
        self.softcap = g.attn_logit_softcapping or 0.0

    def project(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                store: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D] of the (normed) input, RoPE applied; with ``store`` =
        (kv_layer, slot_mapping), k and v are also written to their KV slots."""
        qkv = _apply(self.qkv_proj, x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim)
        q, k = rope.apply(positions, q, k, None if store is None else (*store, v))
        return q, k, v


class MLP(nn.Module):
    """Gated MLP: SwiGLU, or GeGLU for ``gelu_pytorch_tanh`` (Gemma)."""

    def __init__(self, g: ModelGeometry, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(g.hidden_size, 2 * g.intermediate_size, bias=False)
        self.down_proj = nn.Linear(g.intermediate_size, g.hidden_size, bias=False)
        self.act_and_mul = ops.gelu_tanh_and_mul if g.hidden_act == Activation.GELU_TANH else ops.silu_and_mul
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _apply(self.down_proj, self.act_and_mul(_apply(self.gate_up_proj, x)))
        return out if self.tp is None else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    """One decoder layer; ``tp`` (None: a single rank) all-reduces its row-parallel outputs."""

    def __init__(self, g: ModelGeometry, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.self_attn = Attention(g)
        self.post_attention_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.mlp = MLP(g, tp)
        self.tp = tp
        self.attn_scale, self.attn_softcap = self.self_attn.scale, self.self_attn.softcap

    def pre_attn(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                 store: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense work before attention: q, k, v of the residual stream ``x`` (and, with ``store`` =
        (kv_layer, slot_mapping), k and v written to their KV slots)."""
        return self.self_attn.project(self.input_layernorm(x), positions, rope, store)

    def post_attn(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Dense work after attention: O-projection, residual, MLP; the next residual stream."""
        o = _apply(self.self_attn.o_proj, attn.reshape(-1, self.self_attn.q_size))
        h, x = self.post_attention_layernorm(o if self.tp is None else self.tp.all_reduce(o), x)
        return x + self.mlp(h)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                kv_layer: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, _, _ = self.pre_attn(x, positions, rope, store=(kv_layer, meta.slot_mapping))
        return self.post_attn(x, paged_attention(q, kv_layer, meta, self.attn_scale, softcap=self.attn_softcap))


class LlamaModel(nn.Module):
    """The decoder stack plus LM head (a ``models.protocol.CausalLM``). ``forward`` returns final
    hidden states of every token.

    ``geometry`` is this rank's (heads and MLP width of its shard); ``shard`` says which slice of
    the full model that is, ``tp`` runs the collectives (None: a single rank). Subclasses change
    ``layer_class``, ``embed``, ``compute_logits`` and the checkpoint conventions
    (``_convert``, ``_norm_init``).
    """

    layer_class: type[nn.Module] = DecoderLayer
    _norm_init = 1.0   # what a norm weight of a random (dummy) model holds, in the checkpoint's convention
    # FP8 dense layers (``fp8.quantize_modules``, set by the loader): whether, and the checkpoint's
    # FP8 layout (None: high-precision tensors, quantized as they load)
    fp8 = False
    fp8_layout: Fp8Checkpoint | None = None

    def __init__(self, g: ModelGeometry, shard: Shard | None = None, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.shard = shard or Shard.of(g)
        self.full_geometry = g
        g = self.shard.local_geometry(g)
        self.geometry = g
        self.tp = tp if self.shard.world > 1 else None
        self.embed_tokens = nn.Embedding(g.vocab_size, g.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(g, self.tp) for _ in range(g.num_layers))
        self.norm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.lm_head = None if g.tie_word_embeddings else nn.Linear(g.hidden_size, g.vocab_size, bias=False)
        self.tied_head: QuantLinear | None = None   # the LM head over a tied embedding's GGUF blocks
        self.rope: RotaryEmbedding | None = None  # set by the loader once the model is on its device

    def setup_rope(self, max_positions: int, device: torch.device) -> None:
        g = self.geometry
        self.rope = RotaryEmbedding(g.head_dim, max_positions, g.rope_theta, g.rope_scaling, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, self.rope, kv_cache[i], meta)
        return self.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm_head if self.lm_head is not None else self.tied_head
        if head is None:
            return dense(hidden, self.embed_tokens.weight).float()
        return _apply(head, hidden).float()

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in (this rank's slice of each), fusing q/k/v and gate/up; every
        parameter must be covered."""
        params = dict(self.named_parameters())
        if self.fp8:
            tensors = fp8_stream(tensors, self.fp8_layout)
        g = self.geometry
        q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
        fused = {
            "q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv), "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, g.intermediate_size),
            "up_proj": ("gate_up_proj", g.intermediate_size, g.intermediate_size),
        }
        filled: dict[str, int] = {}
        blocks: dict[str, list[tuple[int, QuantBlocks]]] = {}   # parameter -> (first row, GGUF blocks)
        for stored, tensor in tensors:
            part = getattr(tensor, "gguf_blocks", None)
            name = stored.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints still ship a copy
            if "rotary_emb" in name:
                continue
            if not self.fp8 and (tensor.dtype in FP8_TYPES or name.endswith(("_scale", "_scale_inv"))):
                raise ConfigError(f"checkpoint tensor {stored!r} is FP8 data or a scale, but config.json has no "
                                  "quantization_config saying how to read it")   # cast without scales: wrong
            parts = name.split(".")
            if len(parts) >= 2:
                span = self.shard.rows(parts[-2], g.head_dim)
                # a weight is sliced along its layer's axis; per-output-row tensors (bias, FP8
                # scales) only with the rows of a column-parallel layer (row-parallel: replicated)
                axis = Shard.axis(parts[-2]) if parts[-1] == "weight" else 0
                if span is not None and (parts[-1] == "weight" or Shard.axis(parts[-2]) == 0):
                    tensor = tensor.narrow(axis, span[0], span[1] - span[0])
                    part = part and part.narrow(axis, span[0], span[1] - span[0])
            target, offset, size = name, 0, None
            if len(parts) >= 2 and parts[-2] in fused:
                new, offset, size = fused[parts[-2]]
                target = ".".join(parts[:-2] + [new, parts[-1]])
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
            param = params[target]
            converted = self._convert(target, tensor)
            if part is not None and converted is tensor:
                blocks.setdefault(target, []).append((offset, part))
            tensor = converted
            with torch.no_grad():
                dest = param if size is None else param.narrow(0, offset, size)
                if dest.shape != tensor.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(dest.shape)}")
                dest.copy_(tensor.to(dtype=param.dtype, device=param.device))
            filled[target] = filled.get(target, 0) + tensor.numel()
        missing = [n for n, p in params.items() if filled.get(n, 0) != p.numel()]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        self._keep_blocks(params, blocks)

    def _keep_blocks(self, params: dict[str, nn.Parameter], blocks: dict[str, list[tuple[int, QuantBlocks]]]) -> None:
        """Dense layers whose weight arrived whole as GGUF blocks of one format become
        ``QuantLinear`` s over them, their float32 weight dropped; an embedding's blocks become a
        ``QuantEmbedding`` and, tied, ``tied_head``. The others keep the float32 path."""
        kept = 0
        for target, parts in blocks.items():
            param = params[target]
            whole = QuantBlocks.cat(parts, param.shape[0])
            if whole is None or whole.cols != param.shape[1] or param.device.type != "cpu" or param.dtype != torch.float32:
                continue
            if target == "embed_tokens.weight":   # the lookup dequantizes the rows it reads
                self.embed_tokens = QuantEmbedding(whole)
                if self.lm_head is None:
                    self.tied_head = QuantLinear(whole, None)   # the same blocks, not a copy
                    kept += 1
                continue
            owner, _, attr = target.rpartition(".")
            layer = self.get_submodule(owner)
            if attr != "weight" or not isinstance(layer, nn.Linear):
                continue
            parent, _, child = owner.rpartition(".")
            self.get_submodule(parent).register_module(child, QuantLinear(whole, layer.bias))
            kept += 1
        if kept:
            log.info("%d dense layers run on their GGUF blocks (quant_dense, %s)", kept, isa_name())

    def _convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor in the form this model's parameter holds (as is, here)."""
        return tensor

    def init_random(self, seed: int) -> None:
        """Random weights of the right scale (dummy load format, for benchmarks). Drawn as the full
        model's HF tensors and loaded like a checkpoint, so every rank count serves the same model."""
        self.load_weights(self._random_tensors(seed))

    def _layer_norm_names(self) -> tuple[str, ...]:
        return ("input_layernorm", "post_attention_layernorm")

    def _random_tensors(self, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
        g, p = self.full_geometry, self.embed_tokens.weight
        h, q, kv = g.hidden_size, g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
        shapes = [("embed_tokens.weight", (g.vocab_size, h))]
        for i in range(g.num_layers):
            pre = f"layers.{i}."
            shapes += [(pre + f"{n}.weight", (h,)) for n in self._layer_norm_names()]
            if g.qk_norm:
                shapes += [(pre + "self_attn.q_norm.weight", (g.head_dim,)), (pre + "self_attn.k_norm.weight", (g.head_dim,))]
            shapes += [(pre + "self_attn.q_proj.weight", (q, h)), (pre + "self_attn.k_proj.weight", (kv, h)),
                       (pre + "self_attn.v_proj.weight", (kv, h)), (pre + "self_attn.o_proj.weight", (h, q)),
                       (pre + "mlp.gate_proj.weight", (g.intermediate_size, h)),
                       (pre + "mlp.up_proj.weight", (g.intermediate_size, h)),
                       (pre + "mlp.down_proj.weight", (h, g.intermediate_size))]
            if g.qkv_bias:
                shapes += [(pre + f"self_attn.{n}_proj.bias", (size,)) for n, size in (("q", q), ("k", kv), ("v", kv))]
        shapes.append(("norm.weight", (h,)))
        if not g.tie_word_embeddings:
            shapes.append(("lm_head.weight", (g.vocab_size, h)))
        for k, (name, shape) in enumerate(shapes):
            t = torch.empty(shape, dtype=p.dtype, device=p.device)
            if name.endswith("norm.weight"):
                yield name, t.fill_(self._norm_init)
            else:
                yield name, t.normal_(0.0, 0.02, generator=torch.Generator(device=p.device).manual_seed(seed + k))
