"""Paged attention over the worker's KV pool, in plain torch.

This is the portable path (it runs on the CPU device in CI) and the reference the fused GPU kernels
are checked against. KV for one layer is ``[num_blocks, block_size, kv_heads, head_dim]``; a token at
position p of a request lives in slot ``block_table[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

import dataclasses

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

    @property
    def num_decodes(self) -> int:
        return int(self.decode_token_idx.shape[0])


def write_kv(kv_layer: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store this iteration's k/v ([T, kv_heads, D]) into their slots. kv_layer: [2, blocks, bs, H, D]."""
    heads, dim = k.shape[1], k.shape[2]
    kv_layer[0].view(-1, heads, dim).index_copy_(0, slot_mapping, k)
    kv_layer[1].view(-1, heads, dim).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention for every token of the batch against the KV already written for it.

    q: [T, Hq, D] -> out [T, Hq, D]. GQA is handled by SDPA's grouped heads.
    """
    out = torch.empty_like(q)
    heads, dim = kv_layer.shape[-2], kv_layer.shape[-1]
    k_flat = kv_layer[0].view(-1, heads, dim)
    v_flat = kv_layer[1].view(-1, heads, dim)
    if meta.num_decodes:
        qd = q[meta.decode_token_idx].unsqueeze(2)                      # [B, Hq, 1, D]
        kd = k_flat[meta.decode_slots].transpose(1, 2)                  # [B, Hk, S, D]
        vd = v_flat[meta.decode_slots].transpose(1, 2)
        mask = meta.decode_mask[:, None, None, :]                       # [B, 1, 1, S]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
        out[meta.decode_token_idx] = od.squeeze(2)
    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)                       # [1, Hq, n, D]
        kp = k_flat[span.ctx_slots].transpose(0, 1).unsqueeze(0)        # [1, Hk, L, D]
        vp = v_flat[span.ctx_slots].transpose(0, 1).unsqueeze(0)
        if span.ctx_start == 0:
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            length = span.ctx_start + span.num_tokens
            q_pos = torch.arange(span.ctx_start, length, device=q.device)
            mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
