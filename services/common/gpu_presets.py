"""GPUs the benchmarks can emulate on a faster one (``--emulate-gpu``; docs/design.md, "GPU emulation").

A preset is what the roofline of a GPU stage needs: memory bandwidth for the bytes it moves, the
dense 16-bit tensor rate for its FLOPs, the PCIe rate for host<->device copies, and the memory size
the KV budget follows. Values are vendor datasheet peaks (dense, no sparsity); real cards reach a
fraction of them, so an emulated card is, if anything, a little faster than the real one and NEO's
emulated gain a little smaller than on the real card.

Emulation is a measuring instrument for benchmarks, never a serving mode: the operator refuses it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuPreset:
    """One emulated GPU: ``bandwidth_gbs`` (device memory, GB/s), ``tensor_tflops`` (dense bf16/fp16
    tensor rate; Turing has no bf16, its fp16 rate stands in), ``pcie_gbs`` (one direction),
    ``memory_gib``."""

    name: str
    product: str
    memory_gib: float
    bandwidth_gbs: float
    tensor_tflops: float
    pcie_gbs: float

    def seconds(self, num_bytes: float, flops: float) -> float:
        """Roofline time of work that moves ``num_bytes`` through device memory and does ``flops``."""
        return max(num_bytes / (self.bandwidth_gbs * 1e9), flops / (self.tensor_tflops * 1e12))

    def copy_seconds(self, num_bytes: float) -> float:
        """Time of a host<->device copy of ``num_bytes`` over this card's PCIe link."""
        return num_bytes / (self.pcie_gbs * 1e9)

    def label(self, real_gpu: str) -> str:
        """What every log line, metric, JSON and plot that touches emulation says."""
        return f"emulated {self.name} on {real_gpu}"


GPU_PRESETS: dict[str, GpuPreset] = {p.name: p for p in (
    # Tesla T4 (Turing): 320 GB/s GDDR6, 65 TFLOPS fp16 tensor, PCIe 3.0 x16, 16 GB.
    GpuPreset("t4", "Tesla-T4", 16.0, 320.0, 65.0, 16.0),
    # A10G (AWS G5; GA102 like the A10, lower clocks): 600 GB/s, ~70 TFLOPS bf16 tensor, PCIe 4.0 x16, 24 GB.
    GpuPreset("a10g", "NVIDIA-A10G", 24.0, 600.0, 70.0, 32.0),
    # L4 (Ada): 300 GB/s GDDR6, 121 TFLOPS bf16 tensor, PCIe 4.0 x16, 24 GB.
    GpuPreset("l4", "NVIDIA-L4", 24.0, 300.0, 121.0, 32.0),
    # L40S (Ada): 864 GB/s GDDR6, 362 TFLOPS bf16 tensor, PCIe 4.0 x16, 48 GB.
    GpuPreset("l40s", "NVIDIA-L40S", 48.0, 864.0, 362.0, 32.0),
)}


def preset(name: str) -> GpuPreset:
    """The preset called ``name``; a ValueError naming the known ones otherwise."""
    try:
        return GPU_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown GPU preset {name!r}; known: {', '.join(GPU_PRESETS)}") from None
