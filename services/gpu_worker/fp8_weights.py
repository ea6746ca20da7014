"""The checkpoint stream of an FP8 model: dense weights as (float8_e4m3fn weight, per-row scale).

``LlamaModel.load_weights`` places Hugging Face-named tensors; for a model whose dense layers are
``fp8.Fp8Linear`` this module turns whatever the file holds into what those layers take, before the
loader fuses and shards them:

- an FP8 dense weight (``*_proj.weight`` in float8_e4m3fn) is paired with its scale: a
  ``weight_scale`` of one element (per tensor) or one per output row (``[out]`` or ``[out, 1]``:
  per channel), or a block grid (``weight_scale_inv``, HF's fine-grained FP8, or compressed-tensors'
  ``block`` strategy), dequantized and quantized again per row; the pair comes out as
  ``weight`` + ``weight_scale [out]`` (float32);
- a high-precision dense weight (a bf16 checkpoint with ``--quantization fp8``, dummy weights, a
  layer a checkpoint left unquantized) is quantized per output row here;
- an FP8 tensor outside the dense layers (an LM head that was not ignored) is dequantized to its
  high-precision value;
- static activation scales (``input_scale``) and KV-cache scales are dropped: activations are
  quantized per token at run time, and the KV cache stays in its own dtype.

A tensor that does not fit the layout (an FP8 weight without its scale, a scale without its weight,
a scale of the wrong shape, FP8 in another format than e4m3) is an error naming it.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch

from neo_common.model_source import Fp8Checkpoint
from neo_common.settings import ConfigError
from neo_gpu_worker.fp8 import DENSE, FP8_TYPES, quantize_rows

_SCALES = ("weight_scale", "weight_scale_inv")
_DROPPED = ("input_scale", "output_scale", "k_scale", "v_scale", "kv_scale", "weight_zero_point")


def _module_and_kind(name: str) -> tuple[str, str, str]:
    """``a.b.q_proj.weight_scale`` -> (``a.b.q_proj``, ``q_proj``, ``weight_scale``)."""
    module, _, suffix = name.rpartition(".")
    return module, module.rpartition(".")[2], suffix


class _Pending:
    """An FP8 tensor waiting for its scale (or the reverse): checkpoint files keep a weight beside
    its scale, so few wait at once."""

    def __init__(self) -> None:
        self.weight: tuple[str, torch.Tensor] | None = None
        self.scale: tuple[str, torch.Tensor] | None = None


def fp8_stream(tensors: Iterable[tuple[str, torch.Tensor]], layout: Fp8Checkpoint | None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Adapt a checkpoint's tensors for a model of FP8 dense layers (module docstring). ``layout``:
    the checkpoint's declared FP8 layout (None: a high-precision checkpoint, quantized here)."""
    pending: dict[str, _Pending] = {}
    for name, t in tensors:
        module, kind, suffix = _module_and_kind(name)
        if suffix in _DROPPED:
            continue
        if suffix in _SCALES or (suffix == "weight" and t.dtype in FP8_TYPES):
            if layout is None:
                raise ConfigError(f"checkpoint tensor {name!r} is FP8 data or a scale, but config.json has "
                                  "no quantization_config saying how to read it")
            if t.dtype == torch.float8_e5m2:
                raise ConfigError(f"checkpoint tensor {name!r} is float8_e5m2; FP8 weights must be float8_e4m3fn")
            slot = pending.setdefault(module, _Pending())
            if suffix == "weight":
                slot.weight = (name, t)
            elif slot.scale is not None:
                raise ConfigError(f"checkpoint tensor {name!r}: {module!r} has two scales ({slot.scale[0]!r})")
            else:
                slot.scale = (name, t)
            if slot.weight is not None and slot.scale is not None:
                del pending[module]
                weight, scale = _paired(slot.weight, slot.scale, layout)
                if kind in DENSE:
                    yield module + ".weight", weight
                    yield module + ".weight_scale", scale
                else:   # not an FP8 layer here (e.g. an LM head): its high-precision value
                    yield module + ".weight", weight.float() * scale[:, None]
        elif suffix == "weight" and kind in DENSE:
            weight, scale = quantize_rows(t)
            yield name, weight
            yield module + ".weight_scale", scale
        else:
            yield name, t
    for module, slot in pending.items():
        if slot.weight is not None:
            raise ConfigError(f"checkpoint tensor {slot.weight[0]!r} is FP8 but its scale "
                              f"({module}.weight_scale) is missing")
        raise ConfigError(f"checkpoint tensor {slot.scale[0]!r} is a scale without its FP8 weight ({module}.weight)")


def _paired(weight: tuple[str, torch.Tensor], scale: tuple[str, torch.Tensor], layout: Fp8Checkpoint
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scale per output row) of a checkpoint's weight and scale tensors."""
    (w_name, w), (s_name, s) = weight, scale
    if w.dim() != 2:
        raise ConfigError(f"checkpoint tensor {w_name!r}: an FP8 weight must be 2-D, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    s = s.float()
    if s.numel() == 1:
        return w, s.reshape(1).expand(rows).contiguous()
    if s.dim() <= 2 and s.numel() == rows and (s.dim() == 1 or s.shape[1] == 1):
        return w, s.reshape(rows).contiguous()
    block = layout.block
    if block is not None and s.dim() == 2:
        grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        if tuple(s.shape) == grid:
            full = s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
            return quantize_rows(w.float() * full)
        raise ConfigError(f"checkpoint tensor {s_name!r}: shape {tuple(s.shape)} is not the {grid} grid of "
                          f"{block[0]}x{block[1]} blocks over {w_name!r} {tuple(w.shape)}")
    raise ConfigError(f"checkpoint tensor {s_name!r}: shape {tuple(s.shape)} fits neither a per-tensor scale "
                      f"(1 element) nor a per-channel one ({rows} rows of {w_name!r})")
