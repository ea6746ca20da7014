"""The dense-layer matmul of every model: ``F.linear``, made batch-invariant on the CPU device.

A CPU BLAS picks other kernels (other summation orders) for small row counts, so one row's result
would depend on how many rows share its batch. The CPU device must be batch-invariant: a request
decodes the same tokens alone, in any batch, in either pipeline sub-batch, which is what the
offload equivalence tests rely on. (GPU kernels are left alone.) Two ways, the first where torch
has it:

- **oneDNN with a pre-packed weight** (float32 on x86 torch builds): each weight is reordered once
  into oneDNN's blocked layout for a 16-row batch, and every call, of any row count, runs the same
  kernel over it, so a row's sums do not depend on the others; the packed weight is read in one
  pass, so a single decode row costs what a matrix-vector product costs (a 16-row padded MKL call
  cost 3x that on the 2-core machine the embedded default is measured on).
- **padding** (every other case): small batches padded to ``CPU_MIN_ROWS`` rows, from which on MKL's
  kernels agree.

A GGUF model's dense layers on the CPU device do not come here: they run on the file's blocks
(``quant_dense.QuantLinear``, batch-invariant by construction, ~5x fewer bytes per decode step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPU_MIN_ROWS = 16
_PACK_ROWS = 16   # the batch oneDNN packs for: with a 1-row hint a single row takes another kernel


def _onednn_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))


_ONEDNN = _onednn_available()


def uses_onednn(x: torch.Tensor) -> bool:
    """Whether ``dense`` runs ``x`` through oneDNN's packed path."""
    return _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's packed layout. A parameter keeps its packed copy (remade when the
    parameter is written or replaced: its version, storage or dtype changed); a temporary weight
    (an FP8 layer's dequantized one) is packed for this call only."""
    key = (weight.data_ptr(), _version(weight), weight.dtype, tuple(weight.shape))
    held = getattr(weight, "_neo_packed", None)
    if held is not None and held[0] == key:
        return held[1]
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS)
    if isinstance(weight, torch.nn.Parameter):
        weight._neo_packed = (key, packed)
    return packed


def _version(t: torch.Tensor) -> int:
    """How often ``t`` was written in place (-1 for an inference tensor, which keeps no count: made
    under ``torch.inference_mode``, it cannot be written outside it)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that is batch-invariant on the CPU device (see the module docstring)."""
    rows = x.shape[0]
    if rows and x.dim() == 2 and uses_onednn(x) and weight.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(weight), bias, "none", [], "")
    if x.device.type == "cpu" and 0 < rows < CPU_MIN_ROWS:
        padded = torch.cat([x, x.new_zeros(CPU_MIN_ROWS - rows, x.shape[1])])
        return F.linear(padded, weight, bias)[:rows]
    return F.linear(x, weight, bias)
