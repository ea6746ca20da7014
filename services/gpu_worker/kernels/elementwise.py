"""Fused row-wise kernels of a decoder layer: RMSNorm (with the residual add), SwiGLU and RoPE (alone,
or with the k/v write into the KV cache).

Each replaces the half-dozen small torch kernels of its twin in ``neo_gpu_worker.ops`` with one
launch, and rounds where the twin rounds (to the activation dtype after the residual add, after
normalizing, after the SiLU), so the two agree to the last bit or one of it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro,
                     n, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
        x = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    y = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``norm(x)``, or with ``residual``: ``s = residual + x`` then ``(norm(s), s)``. x: ``[T, N]``."""
    rows, n = x.shape
    out = torch.empty_like(x)
    summed = None if residual is None else torch.empty_like(x)
    if rows:
        _rms_norm_kernel[(rows,)](x, x if residual is None else residual, weight, out,
                                  out if summed is None else summed,
                                  x.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
                                  0 if summed is None else summed.stride(0), n, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n))
    return out, summed


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``[T, 2I]`` laid out ``[gate | up]`` -> ``[T, I]``."""
    rows, width = gate_up.shape
    n = width // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block)
    return out


@triton.jit
def _rotate_rows(base, heads, cos, sin, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, stride_h):
    """Rotate one token's heads at ``base`` in place; returns the two rotated halves."""
    h = tl.arange(0, HEADS_PAD)
    ptr = base + h[:, None] * stride_h + tl.arange(0, HALF)[None, :]
    mask = (h < heads)[:, None]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(base.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(base.dtype.element_ty)
    tl.store(ptr, y1, mask=mask)
    tl.store(ptr + HALF, y2, mask=mask)
    return y1, y2


@triton.jit
def _angles(pos_ptr, cos_ptr, sin_ptr, stride_c, HALF: tl.constexpr):
    """This program's token's cos and sin rows ``[1, HALF]``: the tables repeat their first half
    (HF's rotate-half layout), so one half serves both."""
    pos = tl.load(pos_ptr + tl.program_id(0))
    i = tl.arange(0, HALF)
    return tl.load(cos_ptr + pos * stride_c + i)[None, :], tl.load(sin_ptr + pos * stride_c + i)[None, :]


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_t, stride_h, stride_c, num_heads,
                 HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    cos, sin = _angles(pos_ptr, cos_ptr, sin_ptr, stride_c, HALF)
    _rotate_rows(x_ptr + tl.program_id(0) * stride_t, num_heads, cos, sin, HEADS_PAD, HALF, stride_h)


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, H, D]`` (a strided view is fine: heads and dims contiguous) in place."""
    tokens, heads, dim = x.shape
    assert x.stride(2) == 1 and cos.stride(1) == 1
    if tokens:
        _rope_kernel[(tokens,)](x, positions, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads,
                                HEADS_PAD=triton.next_power_of_2(heads), HALF=dim // 2)
    return x


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c,
                       stride_slot, stride_ch, q_heads, kv_heads,
                       QH_PAD: tl.constexpr, KH_PAD: tl.constexpr, HALF: tl.constexpr):
    t = tl.program_id(0)
    i = tl.arange(0, HALF)
    cos, sin = _angles(pos_ptr, cos_ptr, sin_ptr, stride_c, HALF)
    _rotate_rows(q_ptr + t * stride_qt, q_heads, cos, sin, QH_PAD, HALF, stride_qh)
    k1, k2 = _rotate_rows(k_ptr + t * stride_kt, kv_heads, cos, sin, KH_PAD, HALF, stride_kh)
    h = tl.arange(0, KH_PAD)
    mask = (h < kv_heads)[:, None]
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cache = slot * stride_slot + h[:, None] * stride_ch + i[None, :]
    tl.store(kc_ptr + cache, k1.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(kc_ptr + cache + HALF, k2.to(kc_ptr.dtype.element_ty), mask=mask)
    v = v_ptr + t * stride_vt + h[:, None] * stride_vh + i[None, :]
    tl.store(vc_ptr + cache, tl.load(v, mask=mask, other=0.0).to(vc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + cache + HALF, tl.load(v + HALF, mask=mask, other=0.0).to(vc_ptr.dtype.element_ty), mask=mask)


def rope_and_store_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[T, Hq, D]`` and k ``[T, Hkv, D]`` in place (strided views are fine: heads and dims
    contiguous) and write k and v to their slots of ``kv_layer`` ``[2, blocks, bs, Hkv, D]``: RoPE and
    ``write_kv`` in one launch."""
    tokens, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and cos.stride(1) == 1 and kv_layer.is_contiguous()
    k_cache, v_cache = kv_layer[0], kv_layer[1]   # [blocks, bs, Hkv, D]: a slot's heads are contiguous
    if tokens:
        _rope_store_kernel[(tokens,)](q, k, v, positions, slot_mapping, cos, sin, k_cache, v_cache,
                                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                      cos.stride(0), kv_heads * dim, dim, q_heads, kv_heads,
                                      QH_PAD=triton.next_power_of_2(q_heads), KH_PAD=triton.next_power_of_2(kv_heads),
                                      HALF=dim // 2)
    return q, k
