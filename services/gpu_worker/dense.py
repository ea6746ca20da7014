"""The dense-layer matmul of every model: ``F.linear``, made batch-invariant on the CPU device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# CPU BLAS picks other kernels (other summation orders) for small row counts, so one row's result
# would depend on how many rows share its batch. Padding small batches to this many rows makes the
# CPU device batch-invariant: a request decodes the same tokens alone, in any batch, in either
# pipeline sub-batch, which is what the offload equivalence tests rely on. (GPU kernels are left
# alone: padding would cost real time there.)
CPU_MIN_ROWS = 16


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that is batch-invariant on the CPU device (see ``CPU_MIN_ROWS``)."""
    rows = x.shape[0]
    if x.device.type == "cpu" and 0 < rows < CPU_MIN_ROWS:
        padded = torch.cat([x, x.new_zeros(CPU_MIN_ROWS - rows, x.shape[1])])
        return F.linear(padded, weight, bias)[:rows]
    return F.linear(x, weight, bias)
