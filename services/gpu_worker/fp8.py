"""FP8 dense layers: float8_e4m3fn weights with one float32 scale per output channel.

``Fp8Linear`` replaces a dense ``nn.Linear`` (q/k/v/o, gate/up/down; never embeddings, norms or
the LM head) when the geometry's ``quantization`` is ``fp8``. Its matmul has two forms:

- **scaled_mm** (CUDA GPUs with FP8 tensor cores, compute capability >= 8.9): the activation rows
  are quantized on the fly to e4m3 with one scale per token (row amax / 448), and
  ``torch._scaled_mm`` multiplies the FP8 operands with row-wise scales (the activations' per
  token, the weight's per output channel) into bf16. Every step stays on the device (no host
  reads), so CUDA graphs capture it. Batches of at most ``w8a16_rows`` rows (decode steps) take
  a Triton kernel instead that reads the FP8 weight and multiplies it, converted in registers,
  with the unquantized activations (``kernels/fp8_quant.py``): those steps are bound by the
  weight bytes, which it reads at one byte each, and ``_scaled_mm``'s kernels are tuned for large
  batches.
- **the dequantizing twin** (the CPU device, a float32 model, shapes ``_scaled_mm`` refuses):
  ``weight.float() * scale`` in the compute dtype, then the ordinary matmul. It is the reference
  the tests compare against; it saves memory but no time.

Per-channel scales are what make fusion and tensor parallelism simple: q/k/v (and gate/up) fuse
into one weight whose rows keep their own scales, and a rank's rows (column-parallel layers) or
columns (row-parallel ones) come with the scales of the rows it holds. A checkpoint's per-tensor
scale becomes the same scale on each of its rows.
"""

from __future__ import annotations

import torch
from torch import nn

from neo_common.settings import ConfigError
from neo_gpu_worker.dense import dense

FP8 = torch.float8_e4m3fn
FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = 448.0          # the largest finite e4m3fn value
_MIN_SCALE = 1e-12       # an all-zero row still gets a usable (positive) scale
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores
# Batches up to this many rows take the weight-only FP8 kernel: on an H200 (llama-3-8b decode) it
# beat _scaled_mm at batch 1 and lost at 32 and 128 (docs/benchmarks/fp8)
W8A16_ROWS = 16
DENSE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")   # HF names
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")   # the engine's dense modules


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> (float8_e4m3fn weight, float32 scale ``[out]``), scale = row amax / 448."""
    wf = w.float()
    scale = (wf.abs().amax(dim=-1) / FP8_MAX).clamp_min(_MIN_SCALE)
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 ``weight [out, in]`` times its per-row ``scale [out]``, in ``dtype``."""
    return (weight.float() * scale.float()[:, None]).to(dtype)


def supports_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def check_device(device: torch.device) -> None:
    """FP8 weights on a CUDA GPU without FP8 tensor cores are refused at start, naming the GPU (the
    twin would run, but slower than the unquantized model: nobody asks for that)."""
    if device.type == "cuda" and not supports_fp8(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"--quantization fp8 / an FP8 checkpoint needs FP8 tensor cores (compute capability "
                          f">= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}); {torch.cuda.get_device_name(device)} "
                          f"is {major}.{minor}: serve a bf16 checkpoint with --quantization none")


class Fp8Linear(nn.Module):
    """A dense layer with float8_e4m3fn ``weight [out, in]``, float32 ``weight_scale [out]`` and an
    optional ``bias`` (compute dtype). ``scaled_mm`` (set by :func:`prepare` once the weights are on
    their device) picks the FP8 GEMM over the dequantizing twin."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = bias
        self.scaled_mm = False
        self.w8a16_rows = 0

    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize a high-precision ``w [out, in]`` into this layer (random weights, the profiler)."""
        q, s = quantize_rows(w)
        with torch.no_grad():
            self.weight.copy_(q)
            self.weight_scale.copy_(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Through ``_scaled_mm`` (FP8 GPUs) or the dequantizing twin, batch-invariant on the CPU."""
        if self.scaled_mm:
            return scaled_linear(x, self.weight, self.weight_scale, self.bias, self.w8a16_rows)
        return dense(x, dequantize(self.weight, self.weight_scale, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, scaled_mm={self.scaled_mm}"


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, K]`` -> (float8_e4m3fn ``[T, K]``, float32 per-token scale ``[T, 1]``): dynamic, so
    no calibration is needed and an outlier token does not cost the others their precision."""
    if x.is_cuda:
        from neo_gpu_worker.kernels import triton_available

        if triton_available():
            from neo_gpu_worker.kernels.fp8_quant import quantize_rows_fp8

            return quantize_rows_fp8(x)
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(_MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, w8a16_rows: int = 0) -> torch.Tensor:
    """``x @ (weight * weight_scale).T (+ bias)`` as an FP8 GEMM with per-token activation scales
    (or, for at most ``w8a16_rows`` rows, the weight-only FP8 kernel)."""
    shape = x.shape
    if x.numel() // shape[-1] <= w8a16_rows:
        from neo_gpu_worker.kernels.fp8_quant import w8a16_matmul

        out = w8a16_matmul(x.reshape(-1, shape[-1]), weight, weight_scale)
        return (out if bias is None else out + bias).view(*shape[:-1], weight.shape[0])
    xq, x_scale = quantize_activations(x.reshape(-1, shape[-1]))
    # weight [N, K] row-major is the column-major [K, N] operand _scaled_mm wants; row-wise scales
    # need bf16 output
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                           out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).view(*shape[:-1], weight.shape[0])


def quantize_modules(module: nn.Module) -> int:
    """Replace the dense ``nn.Linear`` children (``FUSED`` names) under ``module`` by ``Fp8Linear``
    of the same shapes, on the same device (meta, before the weights are allocated). Returns how
    many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in FUSED and isinstance(child, nn.Linear):
                setattr(parent, name, Fp8Linear(child.in_features, child.out_features, child.bias))
                count += 1
    return count


def prepare(module: nn.Module, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
    """Pick each FP8 layer's matmul once its weights are on ``device``: ``_scaled_mm`` on an FP8 GPU
    for a 16-bit compute dtype when the shapes suit it (both dimensions multiples of 16), the twin
    elsewhere (``--dtype float32`` asks for float32 arithmetic, which the twin keeps)."""
    fast = supports_fp8(device) and dtype in (torch.bfloat16, torch.float16)
    from neo_gpu_worker.kernels import triton_available

    for m in module.modules():
        if isinstance(m, Fp8Linear):
            m.scaled_mm = fast and m.in_features % 16 == 0 and m.out_features % 16 == 0
            m.w8a16_rows = W8A16_ROWS if m.scaled_mm and triton_available() else 0


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers take (FP8 weights at one byte each)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
