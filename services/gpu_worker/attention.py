"""Paged attention over the worker's KV pool, in plain torch.

This is the portable path (it runs on the CPU device in CI) and the reference the fused GPU kernels
are checked against. KV for one layer is ``[num_blocks, block_size, kv_heads, head_dim]``; a token at
position p of a request lives in slot ``block_table[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from neo_gpu_worker import ops


@dataclasses.dataclass
class PrefillSpan:
    """One request's prompt chunk: tokens [token_start, token_start+num_tokens) of the flat batch,
    at positions [ctx_start, ctx_start+num_tokens); ``ctx_slots`` indexes its whole context."""

    token_start: int
    num_tokens: int
    ctx_start: int
    ctx_slots: torch.Tensor


@dataclasses.dataclass
class PackedPrefill:
    """Prefill spans packed for one variable-length attention call: ``token_idx`` their tokens in
    the flat batch, ``ctx_slots`` their contexts' KV slots back to back, ``cu_q``/``cu_k``
    cumulative query/context lengths (int32, ``[spans + 1]``), ``max_q``/``max_k`` the longest."""

    token_idx: torch.Tensor
    ctx_slots: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    @classmethod
    def of(cls, spans: list[PrefillSpan]) -> "PackedPrefill":
        device = spans[0].ctx_slots.device
        n_q = [s.num_tokens for s in spans]
        n_k = [s.ctx_start + s.num_tokens for s in spans]
        cu = lambda n: torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32).to(device)  # noqa: E731
        idx = np.concatenate([np.arange(s.token_start, s.token_start + s.num_tokens) for s in spans])
        return cls(torch.from_numpy(idx).to(device), torch.cat([s.ctx_slots for s in spans]), cu(n_q), cu(n_k),
                   max(n_q), max(n_k))


@dataclasses.dataclass
class AttentionMetadata:
    """How the flat token batch of one iteration maps onto the paged KV pool.

    - ``slot_mapping[t]``: KV slot written by token t.
    - decode rows (one new token each): ``decode_token_idx`` into the flat batch, their
      ``block_tables`` ``[B, W]`` (int32, -1 past the end) and context lengths ``seq_lens`` ``[B]``
      (int32, the new token included), on the device; ``max_decode_len`` the longest, when known
      on the host (a CUDA-graph replay does not know it, and the kernel does not need it).
      ``decode_only``: every token of the batch is a decode row, in order.
    - ``prefills``: rows with several new tokens (causal within the chunk, full over earlier context).
    """

    slot_mapping: torch.Tensor
    decode_token_idx: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    prefills: list[PrefillSpan]
    max_decode_len: int | None = None

    @classmethod
    def for_decodes(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    max_decode_len: int | None = None) -> "AttentionMetadata":
        """A batch of decode rows only (token i is row i)."""
        idx = torch.arange(block_tables.shape[0], device=block_tables.device)
        return cls(slot_mapping, idx, block_tables, seq_lens, [], max_decode_len)

    @classmethod
    def for_prefill(cls, slot_mapping: torch.Tensor, span: PrefillSpan) -> "AttentionMetadata":
        none = torch.zeros((0, 1), dtype=torch.int32, device=slot_mapping.device)
        return cls(slot_mapping, none[:, 0].long(), none, none[:, 0], [span], 0)

    @property
    def num_decodes(self) -> int:
        return int(self.decode_token_idx.shape[0])

    @property
    def decode_only(self) -> bool:
        return not self.prefills

    @functools.cached_property
    def packed_prefill(self) -> "PackedPrefill":
        """The prefill spans as one packed batch (built once per iteration, used by every layer)."""
        return PackedPrefill.of(self.prefills)

    def decode_gather(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode twin's slots and mask (``ops.decode_gather``), built by the first layer and
        kept for the others (the CPU device runs the twin eagerly, where 30 layers rebuilding them
        cost ~10 small ops each per iteration)."""
        held = self.__dict__.get("_decode_gather")
        if held is None or held[0] != block_size:
            held = (block_size, ops.decode_gather(self.block_tables, self.seq_lens, block_size, self.max_decode_len))
            self.__dict__["_decode_gather"] = held
        return held[1]

    @functools.cached_property
    def compact_decode_tables(self) -> tuple[torch.Tensor, np.ndarray]:
        """The distinct blocks the decode rows read, and their tables renumbered into that list
        (-1 kept). The same for every layer, so computed once per iteration (CPU device only)."""
        tables = self.block_tables.numpy()
        used = tables >= 0
        blocks, compact = np.unique(tables[used], return_inverse=True)
        local = np.full(tables.shape, -1, np.int32)
        local[used] = compact
        return torch.from_numpy(blocks), local


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float,
                    out: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Attention for every token of the batch against the KV already written for it.

    q: [T, Hq, D] -> out [T, Hq, D] (rows the metadata does not name are left as they are). Decode
    rows go through ``ops.decode_attention`` (the Triton kernel on CUDA; on the CPU device over a
    16-bit cache, the cpu_attention kernel), prefill spans through one packed varlen call on CUDA or
    SDPA per span (``ops.prefill_attention``). When the KV dtype is narrower than the compute dtype (a float32
    model over a 16-bit cache, as on the CPU device with offloading), q and the result are rounded
    through the KV dtype, which is what the CPU attention kernel does with its 16-bit staging rows:
    both paths then compute the same attention, so GPU and CPU decodes give the same tokens.
    ``softcap`` > 0 (Gemma-2) caps the scaled scores; the native CPU kernel and FlashAttention's
    varlen call cannot, so such a model's decodes take the twin or the Triton kernel and its
    prefills the per-span twin.
    """
    out = torch.empty_like(q) if out is None else out
    heads, dim = kv_layer.shape[-2], kv_layer.shape[-1]
    k_flat = kv_layer[0].view(-1, heads, dim)
    v_flat = kv_layer[1].view(-1, heads, dim)
    narrow = kv_layer.dtype != q.dtype
    if narrow:
        q = q.to(kv_layer.dtype).to(out.dtype)
    if meta.num_decodes and _use_native(q, kv_layer) and not softcap:
        _native_decode(q, kv_layer, meta, scale, out)
    elif meta.num_decodes and meta.decode_only and not narrow:
        ops.decode_attention(q, kv_layer[0], kv_layer[1], meta.block_tables, meta.seq_lens, scale, out,
                             meta.max_decode_len, softcap, _twin_gather(q, kv_layer, meta))
    elif meta.num_decodes:
        od = ops.decode_attention(q[meta.decode_token_idx], kv_layer[0], kv_layer[1], meta.block_tables,
                                  meta.seq_lens, scale, torch.empty_like(q[:meta.num_decodes]), meta.max_decode_len,
                                  softcap, _twin_gather(q, kv_layer, meta))
        out[meta.decode_token_idx] = od.to(kv_layer.dtype).to(out.dtype) if narrow else od
    if meta.prefills and not narrow and not softcap and ops.use_varlen(q):
        p = meta.packed_prefill
        out[p.token_idx] = ops.varlen_prefill(q[p.token_idx], k_flat[p.ctx_slots], v_flat[p.ctx_slots],
                                              p.cu_q, p.cu_k, p.max_q, p.max_k, scale)
        return out
    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        op = ops.prefill_attention(q[rows], k_flat[span.ctx_slots], v_flat[span.ctx_slots], span.ctx_start, scale,
                                   softcap)
        out[rows] = op.to(kv_layer.dtype).to(out.dtype) if narrow else op
    return out


def _twin_gather(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata):
    """The kept gather of the decode twin on the CPU device (None elsewhere: the Triton kernel needs
    none, and a CUDA graph's metadata changes between replays)."""
    return meta.decode_gather(kv_layer.shape[2]) if q.device.type == "cpu" else None


_NATIVE_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _use_native(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    """On the CPU device over a 16-bit cache, decode rows use the cpu_attention kernel: several times
    faster than gather + SDPA there, and the very arithmetic CPU-resident rows get, so GPU-only and
    offloaded runs of the CPU twin decode the same tokens."""
    return q.device.type == "cpu" and kv_layer.dtype in _NATIVE_DTYPES


def _native_decode(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float,
                   out: torch.Tensor) -> None:
    from neo_common.host_kernel import kernel  # the data plane's native kernel; torch-free

    index, local = meta.compact_decode_tables
    # Only the blocks these rows read, in the kernel's [blocks, heads, block_size, head_dim] layout.
    k = kv_layer[0][index].transpose(1, 2).contiguous().view(torch.int16).numpy()
    v = kv_layer[1][index].transpose(1, 2).contiguous().view(torch.int16).numpy()
    qd = q[meta.decode_token_idx].to(kv_layer.dtype).contiguous().view(torch.int16).numpy()
    o = kernel.attend(qd, k, v, local, np.ascontiguousarray(meta.seq_lens.numpy(), np.int32),
                      dtype=_NATIVE_DTYPES[kv_layer.dtype], scale=scale)
    out[meta.decode_token_idx] = torch.from_numpy(o.view(np.int16)).view(kv_layer.dtype).to(out.dtype)
