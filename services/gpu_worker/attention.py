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
import torch.nn.functional as F


@dataclasses.dataclass
class PrefillSpan:
    """One request's prompt chunk: tokens [token_start, token_start+num_tokens) of the flat batch,
    at positions [ctx_start, ctx_start+num_tokens); ``ctx_slots`` indexes its whole context."""

    token_start: int
    num_tokens: int
    ctx_start: int
    ctx_slots: torch.Tensor


@dataclasses.dataclass
class AttentionMetadata:
    """How the flat token batch of one iteration maps onto the paged KV pool.

    - ``slot_mapping[t]``: KV slot written by token t.
    - decode rows (one new token each): ``decode_token_idx`` into the flat batch, ``decode_slots``
      ``[B, S]`` context slots padded to the longest context, ``decode_mask`` ``[B, S]`` valid slots.
    - ``prefills``: rows with several new tokens (causal within the chunk, full over earlier context).
    """

    slot_mapping: torch.Tensor
    decode_token_idx: torch.Tensor
    decode_slots: torch.Tensor
    decode_mask: torch.Tensor
    prefills: list[PrefillSpan]
    decode_tables: np.ndarray | None = None   # [B, max_blocks] int32 block tables of the decode rows
    decode_lens: np.ndarray | None = None     # [B] int32 context lengths of the decode rows

    @property
    def num_decodes(self) -> int:
        return int(self.decode_token_idx.shape[0])

    @functools.cached_property
    def compact_decode_tables(self) -> tuple[torch.Tensor, np.ndarray]:
        """The distinct blocks the decode rows read, and their tables renumbered into that list
        (-1 kept). The same for every layer, so computed once per iteration."""
        tables = self.decode_tables
        used = tables >= 0
        blocks, compact = np.unique(tables[used], return_inverse=True)
        local = np.full(tables.shape, -1, np.int32)
        local[used] = compact
        return torch.from_numpy(blocks), local


def write_kv(kv_layer: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store this iteration's k/v ([T, kv_heads, D]) into their slots. kv_layer: [2, blocks, bs, H, D]."""
    heads, dim = k.shape[1], k.shape[2]
    kv_layer[0].view(-1, heads, dim).index_copy_(0, slot_mapping, k.to(kv_layer.dtype))
    kv_layer[1].view(-1, heads, dim).index_copy_(0, slot_mapping, v.to(kv_layer.dtype))


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention for every token of the batch against the KV already written for it.

    q: [T, Hq, D] -> out [T, Hq, D] (rows the metadata does not name are left as they are). GQA is
    handled by SDPA's grouped heads. When the KV dtype is narrower than the compute dtype (a float32
    model over a 16-bit cache, as on the CPU device with offloading), q and the result are rounded
    through the KV dtype, which is what the CPU attention kernel does with its 16-bit staging rows:
    both paths then compute the same attention, so GPU and CPU decodes give the same tokens.
    """
    out = torch.empty_like(q) if out is None else out
    heads, dim = kv_layer.shape[-2], kv_layer.shape[-1]
    k_flat = kv_layer[0].view(-1, heads, dim)
    v_flat = kv_layer[1].view(-1, heads, dim)
    narrow = kv_layer.dtype != q.dtype
    if narrow:
        q = q.to(kv_layer.dtype).to(out.dtype)
    if meta.num_decodes and _use_native(q, kv_layer, meta):
        _native_decode(q, kv_layer, meta, scale, out)
    elif meta.num_decodes:
        qd = q[meta.decode_token_idx].unsqueeze(2)                      # [B, Hq, 1, D]
        kd = k_flat[meta.decode_slots].to(q.dtype).transpose(1, 2)      # [B, Hk, S, D]
        vd = v_flat[meta.decode_slots].to(q.dtype).transpose(1, 2)
        mask = meta.decode_mask[:, None, None, :]                       # [B, 1, 1, S]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
        od = od.squeeze(2)
        out[meta.decode_token_idx] = od.to(kv_layer.dtype).to(out.dtype) if narrow else od
    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)                       # [1, Hq, n, D]
        kp = k_flat[span.ctx_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)   # [1, Hk, L, D]
        vp = v_flat[span.ctx_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
        if span.ctx_start == 0:
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            length = span.ctx_start + span.num_tokens
            q_pos = torch.arange(span.ctx_start, length, device=q.device)
            mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        op = op.squeeze(0).transpose(0, 1)
        out[rows] = op.to(kv_layer.dtype).to(out.dtype) if narrow else op
    return out


_NATIVE_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _use_native(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> bool:
    """On the CPU device over a 16-bit cache, decode rows use the cpu_attention kernel: several times
    faster than gather + SDPA there, and the very arithmetic CPU-resident rows get, so GPU-only and
    offloaded runs of the CPU twin decode the same tokens."""
    return q.device.type == "cpu" and kv_layer.dtype in _NATIVE_DTYPES and meta.decode_tables is not None


def _native_decode(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float,
                   out: torch.Tensor) -> None:
    from neo_cpu_attention import kernel  # the data plane's native kernel; torch-free

    index, local = meta.compact_decode_tables
    # Only the blocks these rows read, in the kernel's [blocks, heads, block_size, head_dim] layout.
    k = kv_layer[0][index].transpose(1, 2).contiguous().view(torch.int16).numpy()
    v = kv_layer[1][index].transpose(1, 2).contiguous().view(torch.int16).numpy()
    qd = q[meta.decode_token_idx].to(kv_layer.dtype).contiguous().view(torch.int16).numpy()
    o = kernel.attend(qd, k, v, local, np.ascontiguousarray(meta.decode_lens, np.int32),
                      dtype=_NATIVE_DTYPES[kv_layer.dtype], scale=scale)
    out[meta.decode_token_idx] = torch.from_numpy(o.view(np.int16)).view(kv_layer.dtype).to(out.dtype)
