"""Shared builders for the operator's pure unit tests."""

from __future__ import annotations

from typing import Any

from neo_operator.nodes import NodeFacts
from neo_operator.spec import NeoServiceSpec, parse_spec

IMAGES = {"gateway": "neo/gateway:t", "gpuWorker": "neo/gpu-worker:t", "cpuAttention": "neo/cpu-attention:t"}
GiB = 1 << 30


def make_spec(**overrides: Any) -> NeoServiceSpec:
    raw: dict[str, Any] = {"model": {"source": "dummy", "name": "llama-3-8b"}, "cpuOffload": {"kvMemory": "16Gi"}}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return parse_spec(raw, IMAGES)


def make_node(name: str = "gpu-1", product: str = "NVIDIA-A10G", memory_mib: int | None = 23028, gpus: int = 1,
              host_gib: int = 128, cpus: float = 32, gbps: float | None = 60.0, threads: int | None = 32) -> NodeFacts:
    return NodeFacts(name=name, gpu_product=product, gpu_memory_mib=memory_mib, gpu_count=gpus,
                     memory_bytes=host_gib * GiB, cpus=cpus, read_gbps=gbps, probe_threads=threads)


def node_dict(name: str, labels: dict[str, str], allocatable: dict[str, str] | None = None,
              annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels, "annotations": annotations or {}},
            "status": {"allocatable": allocatable or {}}}
