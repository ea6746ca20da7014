"""NeoService spec parsing: defaults and the checks the CRD schema cannot express."""

from __future__ import annotations

import pytest

from neo_operator.spec import SpecError, parse_spec

from op_helpers import IMAGES, make_spec


def test_defaults_fill_a_minimal_spec() -> None:
    spec = parse_spec({"model": {"name": "llama-3-8b"}}, IMAGES)
    assert spec.replicas == 1
    assert spec.model.source == "dummy" and spec.model.geometry.name == "llama-3-8b"
    assert spec.gpu.count == 1 and spec.gpu.resource_name == "nvidia.com/gpu"
    assert spec.gpu.memory_utilization == 0.9
    assert spec.offload.mode == "auto" and spec.offload.kv_memory_bytes == 8 << 30
    assert spec.engine.block_size == 16 and spec.engine.max_num_seqs == 256
    assert spec.images.gateway == IMAGES["gateway"] and spec.images.pull_policy == "IfNotPresent"


def test_spec_images_override_operator_defaults() -> None:
    spec = make_spec(images={"gpuWorker": "mine/worker:1"})
    assert spec.images.gpu_worker == "mine/worker:1"
    assert spec.images.gateway == IMAGES["gateway"]


def test_quantity_forms() -> None:
    assert make_spec(cpuOffload={"kvMemory": "1.5Gi"}).offload.kv_memory_bytes == int(1.5 * (1 << 30))
    assert make_spec(cpuOffload={"kvMemory": 1000}).offload.kv_memory_bytes == 1000
    assert make_spec(cpuOffload={"kvMemory": "2G"}).offload.kv_memory_bytes == 2_000_000_000


def test_hf_model_on_a_volume() -> None:
    spec = make_spec(model={"source": "hf", "name": "my-llama", "geometry": "llama-3-8b",
                            "volume": {"claimName": "models", "path": "llama-3-8b"}})
    assert spec.model.claim_name == "models" and spec.model.path == "llama-3-8b"
    assert spec.model.geometry.name == "llama-3-8b" and spec.model.name == "my-llama"


BAD = [
    ({"model": {"name": "gpt-17"}}, "model.name", "UnknownModel"),
    ({"model": {"source": "hf", "name": "x"}}, "model.geometry", "InvalidSpec"),
    ({"model": {"source": "hf", "geometry": "llama-3-8b"}}, "model.volume.claimName", "InvalidSpec"),
    ({"model": {"source": "hf", "geometry": "llama-3-8b", "volume": {"claimName": "m", "path": "/abs"}}},
     "model.volume.path", "InvalidSpec"),
    ({"model": {"source": "hf", "geometry": "llama-3-8b", "volume": {"claimName": "m", "path": "a/../b"}}},
     "model.volume.path", "InvalidSpec"),
    ({"model": {"source": "gguf", "geometry": "llama-3-8b", "volume": {"claimName": "m", "path": "llama.bin"}}},
     "model.volume.path", "InvalidSpec"),
    ({"model": {"name": "llama-2-7b", "maxContext": 8192}}, "model.maxContext", "InvalidSpec"),
    ({"model": {"name": "llama-3-8b"}, "cpuOffload": {"kvMemory": "lots"}}, "cpuOffload.kvMemory", "InvalidSpec"),
    ({"model": {"name": "llama-3-8b"}, "cpuOffload": {"mode": "full", "kvMemory": 0}}, "cpuOffload.kvMemory", "InvalidSpec"),
    ({"model": {"name": "llama-3-8b"}, "cpuOffload": {"mode": "sometimes"}}, "cpuOffload.mode", "InvalidSpec"),
    ({"model": {"name": "llama-3-8b"}, "engine": {"blockSize": 12}}, "engine.blockSize", "InvalidSpec"),
    ({"model": {"name": "llama-3-8b"}, "gpu": {"count": 0}}, "gpu.count", "InvalidSpec"),
    ({"model": {"name": "llama-3-8b"}, "gpu": {"memoryUtilization": 1.5}}, "gpu.memoryUtilization", "InvalidSpec"),
    ({"model": {"name": "llama-3-8b"}, "replicas": True}, "replicas", "InvalidSpec"),
    ({"model": {"name": "llama-3-8b"}, "podTemplate": {"spec": {"hostNetwork": True}}}, "podTemplate.spec", "InvalidSpec"),
    ({"model": {"name": "llama-3-8b"}, "resources": {"sidecar": {}}}, "resources.sidecar", "InvalidSpec"),
]


@pytest.mark.parametrize("raw,field,reason", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_specs_name_the_field_to_fix(raw: dict, field: str, reason: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, IMAGES)
    assert info.value.field == field
    assert info.value.reason == reason
    assert str(info.value).startswith(f"spec.{field}:")


def test_missing_image_without_operator_default() -> None:
    with pytest.raises(SpecError, match="images.gpuWorker"):
        parse_spec({"model": {"name": "llama-3-8b"}}, {"gateway": "g", "cpuAttention": "c"})
