"""GPU products the operator can size for, keyed by the GPU Feature Discovery product label.

Memory comes from the node's ``nvidia.com/gpu.memory`` label when present; the table's value is the
fallback. The HBM bandwidth and the tensor rate (vendor peaks) feed the offload decision: the dense part
of a decode iteration reads all weights once and does 2 FLOPs per parameter and sequence, so its time
is the roofline max(weight bytes / HBM bandwidth, FLOPs / tensor rate).
"""

from __future__ import annotations

import dataclasses

from neo_common.gpu_presets import GPU_PRESETS


@dataclasses.dataclass(frozen=True)
class GpuProduct:
    """One GPU product, from its datasheet: ``memory_mib`` (what GPU Feature Discovery labels),
    ``hbm_gbps`` (device memory bandwidth, GB/s), ``tensor_tflops`` (dense bf16/fp16 tensor rate, no
    sparsity; Turing has no bf16, its fp16 rate stands in), ``pcie_gbps`` (host link, one direction)."""

    label: str
    memory_mib: int
    hbm_gbps: float
    tensor_tflops: float
    pcie_gbps: float


def _preset(name: str, memory_mib: int) -> GpuProduct:
    """The cards the benchmarks emulate: one copy of their datasheet numbers (``neo_common.gpu_presets``)."""
    p = GPU_PRESETS[name]
    return GpuProduct(p.product, memory_mib, p.bandwidth_gbs, p.tensor_tflops, p.pcie_gbs)


GPU_PRODUCTS: dict[str, GpuProduct] = {
    p.label: p
    for p in (
        _preset("t4", 15360),
        _preset("a10g", 23028),
        _preset("l4", 23034),
        _preset("l40s", 46068),
        # A100 (Ampere): 312 TFLOPS bf16 dense, PCIe 4.0 x16 to the host
        GpuProduct("NVIDIA-A100-SXM4-40GB", 40960, 1555.0, 312.0, 32.0),
        GpuProduct("NVIDIA-A100-PCIE-40GB", 40960, 1555.0, 312.0, 32.0),
        GpuProduct("NVIDIA-A100-SXM4-80GB", 81920, 2039.0, 312.0, 32.0),
        GpuProduct("NVIDIA-A100-80GB-PCIe", 81920, 1935.0, 312.0, 32.0),
        # H100/H200 (Hopper): bf16 dense 756 (PCIe), 989 (SXM), 835 (NVL); PCIe 5.0 x16
        GpuProduct("NVIDIA-H100-PCIe", 81559, 2000.0, 756.0, 64.0),
        GpuProduct("NVIDIA-H100-80GB-HBM3", 81559, 3350.0, 989.0, 64.0),
        GpuProduct("NVIDIA-H100-NVL", 95830, 3900.0, 835.0, 64.0),
        GpuProduct("NVIDIA-H200", 143771, 4800.0, 989.0, 64.0),
        GpuProduct("NVIDIA-H200-NVL", 143771, 4800.0, 835.0, 64.0),
    )
}


def lookup_product(label: str) -> GpuProduct | None:
    return GPU_PRODUCTS.get(label)
