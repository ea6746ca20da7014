"""Paged decode attention in Triton: one query token per row against its KV blocks, read in place.

The KV of a layer is ``[num_blocks, block_size, kv_heads, head_dim]`` (keys and values apart); row
b's token t lives in block ``block_tables[b, t // block_size]`` at offset ``t % block_size``. Nothing
is gathered on the host or into a temporary: the kernel walks the block table itself, so its inputs
are a few small device tensors (tables, lengths) that a CUDA graph can keep in static buffers.

Work split (flash-decoding): the grid is ``(rows, kv_heads, splits)``. A program holds the
``group`` query heads that share one KV head (GQA), padded to 16 for the tensor-core dot, and
streams its share of the context in tiles with an online softmax. With one split it writes the
output; with several, each writes its normalized partial output and its (max, sum) of exponents,
and a second kernel merges them. The split count depends only on the batch size rounded up to a
power of two, so a padded CUDA-graph bucket and an eager batch of the same rows use the same
arithmetic.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from neo_gpu_worker.kernels import interpreted

TILE = 64          # tokens per step of the inner loop
MAX_SPLITS = 16


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, o_ptr, m_ptr, l_ptr, scale, softcap,
                   stride_qb, stride_qh, stride_kblk, stride_ktok, stride_kh, stride_tb,
                   stride_ob, stride_oh, stride_os,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   UPCAST: tl.constexpr, SOFTCAP: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE_N) * TILE_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    valid = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=valid[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for t0 in range(start, end, TILE_N):
        t = t0 + tl.arange(0, TILE_N)
        inside = t < end
        block = tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=inside, other=0)
        offs = block.to(tl.int64) * stride_kblk + (t % BLOCK_SIZE) * stride_ktok + kvh * stride_kh
        k = tl.load(k_ptr + offs[:, None] + d[None, :], mask=inside[:, None], other=0.0)
        if UPCAST:  # the interpreter's 16-bit dot is wrong; fp32 products of 16-bit values are exact
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 2 sigmoid(2x) - 1
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        s = tl.where(inside[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs[:, None] + d[None, :], mask=inside[:, None], other=0.0)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]   # an empty split (short context) has l = 0
    if NUM_SPLITS == 1:
        o_offs = b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=valid[:, None])
    else:
        o_offs = b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
        tl.store(o_ptr + o_offs, out, mask=valid[:, None])
        ml_offs = (b * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split
        tl.store(m_ptr + ml_offs, m_i, mask=valid)
        tl.store(l_ptr + ml_offs, l_i, mask=valid)


@triton.jit
def _merge_kernel(part_ptr, m_ptr, l_ptr, o_ptr, stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
                  num_heads, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    ml = (b * num_heads + h) * NUM_SPLITS + s
    m = tl.load(m_ptr + ml)
    l = tl.load(l_ptr + ml)
    weight = tl.exp(m - tl.max(m, 0)) * l          # an empty split: exp(-inf) * 0 = 0
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :])
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per row: enough programs for about two waves over the GPU's SMs."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 132
    programs = triton.next_power_of_2(max(batch, 1)) * num_kv_heads
    if programs >= 2 * sms:
        return 1
    return min(MAX_SPLITS, triton.next_power_of_2(-(-2 * sms // programs)))


def supported(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, out: torch.Tensor, splits: int | None = None,
                     softcap: float = 0.0) -> torch.Tensor:
    """q ``[B, Hq, D]`` -> out ``[B, Hq, D]`` (both may be strided views with contiguous heads and
    dims); caches ``[blocks, block_size, Hkv, D]``; block_tables ``[B, W]`` int32; seq_lens ``[B]``
    int32, each >= 1. Launches without reading any of them on the host (CUDA-graph safe).
    ``splits`` overrides ``num_splits`` (a power of two; for tests). ``softcap`` > 0 caps the scaled
    scores at ``softcap * tanh(s / softcap)`` (Gemma-2)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(3) == 1 and supported(head_dim)
    assert k_cache.stride() == v_cache.stride() and block_tables.stride(1) == 1
    splits = splits or num_splits(batch, num_kv_heads, q.device)
    common = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                  BLOCK_SIZE=block_size, TILE_N=TILE, NUM_SPLITS=splits, UPCAST=interpreted(),
                  SOFTCAP=bool(softcap))
    grid = (batch, num_kv_heads, splits)
    if splits == 1:
        _decode_kernel[grid](q, k_cache, v_cache, block_tables, seq_lens, out, out, out, scale, float(softcap),
                             q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                             block_tables.stride(0), out.stride(0), out.stride(1), 0, **common)
        return out
    part = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    m = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    _decode_kernel[grid](q, k_cache, v_cache, block_tables, seq_lens, part, m, lse, scale, float(softcap),
                         q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                         block_tables.stride(0), part.stride(0), part.stride(1), part.stride(2), **common)
    _merge_kernel[(batch, num_heads)](part, m, lse, out, part.stride(0), part.stride(1), part.stride(2),
                                      out.stride(0), out.stride(1), num_heads, HEAD_DIM=head_dim, NUM_SPLITS=splits)
    return out
