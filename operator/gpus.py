"""GPU products the operator can size for, keyed by the GPU Feature Discovery product label.

Memory comes from the node's ``nvidia.com/gpu.memory`` label when present; the table's value is the
fallback. The HBM bandwidth (vendor peak, GB/s) feeds the offload decision: the dense part of a decode
iteration reads all weights once, so its time is about weight bytes / HBM bandwidth.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuProduct:
    label: str
    memory_mib: int
    hbm_gbps: float


GPU_PRODUCTS: dict[str, GpuProduct] = {
    p.label: p
    for p in (
        GpuProduct("Tesla-T4", 15360, 320.0),
        GpuProduct("NVIDIA-A10G", 23028, 600.0),
        GpuProduct("NVIDIA-L4", 23034, 300.0),
        GpuProduct("NVIDIA-L40S", 46068, 864.0),
        GpuProduct("NVIDIA-A100-SXM4-40GB", 40960, 1555.0),
        GpuProduct("NVIDIA-A100-PCIE-40GB", 40960, 1555.0),
        GpuProduct("NVIDIA-A100-SXM4-80GB", 81920, 2039.0),
        GpuProduct("NVIDIA-A100-80GB-PCIe", 81920, 1935.0),
        GpuProduct("NVIDIA-H100-PCIe", 81559, 2000.0),
        GpuProduct("NVIDIA-H100-80GB-HBM3", 81559, 3350.0),
        GpuProduct("NVIDIA-H100-NVL", 95830, 3900.0),
        GpuProduct("NVIDIA-H200", 143771, 4800.0),
        GpuProduct("NVIDIA-H200-NVL", 143771, 4800.0),
    )
}


def lookup_product(label: str) -> GpuProduct | None:
    return GPU_PRODUCTS.get(label)
