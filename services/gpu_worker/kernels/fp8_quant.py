"""Dynamic per-token FP8 quantization of activation rows, in one launch.

The twin (``neo_gpu_worker.fp8.quantize_activations`` on tensors the kernel does not take) is five
torch kernels (abs, amax, divide, clamp, cast) and a float32 copy of the activations; before an FP8
GEMM of a decode step those launches cost more than the quantization's arithmetic, and for a 4096-token
prefill the copy costs memory bandwidth. One program per row: a pass for the amax, a pass to scale,
clamp and cast, both over ``BLOCK``-wide slices so any width fits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP8_MAX = 448.0
_MIN_SCALE = 1e-12


@triton.jit
def _quant_rows_kernel(x_ptr, out_ptr, scale_ptr, stride_x, stride_o, n, FP8_MAX: tl.constexpr,
                       MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
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
    if rows:
        _quant_rows_kernel[(rows,)](x, out, scale, x.stride(0), out.stride(0), n, FP8_MAX=_FP8_MAX,
                                    MIN_SCALE=_MIN_SCALE, BLOCK=min(4096, triton.next_power_of_2(n)))
    return out, scale
