"""Torch reference of the kernel, for tests and benchmarks only (the product never imports this).

Straightforward fp32 math over gathered blocks: append, gather each request's context, softmax, sum.
"""

from __future__ import annotations

import math

import torch


def reference_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """Same contract as ``neo_common.host_kernel.kernel.attend`` with torch tensors of the KV dtype.

    Appends into ``k_cache``/``v_cache`` in place when ``k_new``/``v_new`` are given; returns fp32
    ``[B, Hq, D]``.
    """
    batch, hq, d = q.shape
    _, hkv, bs, _ = k_cache.shape
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty(batch, hq, d, dtype=torch.float32)
    for b in range(batch):
        n = int(seq_lens[b])
        nb = (n + bs - 1) // bs
        blocks = block_tables[b, :nb].long()
        if k_new is not None:
            pos = n - 1
            k_cache[blocks[pos // bs], :, pos % bs] = k_new[b]
            v_cache[blocks[pos // bs], :, pos % bs] = v_new[b]
        k = k_cache[blocks].permute(1, 0, 2, 3).reshape(hkv, nb * bs, d)[:, :n].float()
        v = v_cache[blocks].permute(1, 0, 2, 3).reshape(hkv, nb * bs, d)[:, :n].float()
        qb = q[b].float().view(hkv, group, d)
        scores = torch.einsum("hgd,htd->hgt", qb, k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hgt,htd->hgd", probs, v).reshape(hq, d)
    return out
