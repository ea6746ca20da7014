"""The FP8 dense layers' kernels: dynamic per-token quantization of activation rows, and the
weight-only FP8 GEMM of decode-sized batches.

``quantize_rows_fp8``: the twin (``neo_gpu_worker.fp8.quantize_activations`` on tensors the kernel
does not take) is five torch kernels (abs, amax, divide, clamp, cast) and a float32 copy of the
activations; before an FP8 GEMM of a decode step those launches cost more than the arithmetic, and
for a 4096-token prefill the copy costs memory bandwidth. One program per row reads the row once
(widths up to 16384, every dense input of an 8B-70B model) or twice (wider).

``w8a16_matmul``: ``x [M, K] @ (w [N, K] fp8 * scale [N]).T`` for small M (decode batches), the FP8
weight converted to the activations' dtype in registers: a decode step is bound by reading the
weights, which this reads at one byte each, while ``torch._scaled_mm``'s row-wise kernels are tuned
for large M. The activations are not quantized, so it is also the more accurate of the two.
Configurations are tuned per weight shape and M bucket at the first call (the worker's warm-up
before CUDA-graph capture makes that call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP8_MAX = 448.0
_MIN_SCALE = 1e-12
_ONE_PASS = 16384   # widest row read once (held in registers)


@triton.jit
def _quant_rows_kernel(x_ptr, out_ptr, scale_ptr, stride_x, stride_o, n, FP8_MAX: tl.constexpr,
                       MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0)
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, MIN_SCALE)
        tl.store(scale_ptr + row, scale)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
        tl.store(scale_ptr + row, scale)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
            tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, K]`` (a row stride of its own allowed) -> (float8_e4m3fn ``[T, K]``, float32 ``[T, 1]``)."""
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    one_pass = n <= _ONE_PASS
    block = triton.next_power_of_2(n) if one_pass else 4096
    if rows:
        _quant_rows_kernel[(rows,)](x, out, scale, x.stride(0), out.stride(0), n, FP8_MAX=_FP8_MAX,
                                    MIN_SCALE=_MIN_SCALE, BLOCK=block, ONE_PASS=one_pass,
                                    num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return out, scale


# Large K tiles and several stages keep tens of KB of weight loads in flight per SM, which a
# bandwidth-bound GEMV needs (16 KB tiles reached ~2 TB/s of the H200's ~4 at batch 1).
_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((16, 512, 4, 4), (16, 1024, 4, 3), (32, 512, 4, 4), (32, 256, 4, 5),
                                 (64, 256, 4, 4), (64, 512, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4))]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "BM"])
@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr):
    offs_m = tl.arange(0, BM)
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + kk[None, :],
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_w + kk[None, :],
                    mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc * s[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_o + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def w8a16_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` (bf16/fp16, M <= 128) times FP8 ``weight [N, K]`` with float32 ``scale [N]``
    per output row -> ``[M, N]`` in x's dtype."""
    rows, k = x.shape
    n = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows:
        bm = max(16, triton.next_power_of_2(rows))
        _w8a16_kernel[lambda meta: (triton.cdiv(n, meta["BN"]),)](
            x, weight, scale, out, rows, n, k, x.stride(0), weight.stride(0), out.stride(0), BM=bm)
    return out
