"""The pure manifest builders: ConfigMap, Deployment, Service, bandwidth probe Job."""

from __future__ import annotations

import json

import pytest

from neo_common.config import NeoConfig
from neo_operator import constants as c
from neo_operator.configmap import build_configmap, config_hash, configmap_name, configmaps_to_prune
from neo_operator.deployment import build_deployment
from neo_operator.nodes import parse_probe_record
from neo_operator.probejob import (ProbeResultError, build_probe_job, parse_probe_message, probe_job_name,
                                   probe_pod_result, probe_record)
from neo_operator.service import build_service, service_url
from neo_operator.sizing import size

from op_helpers import make_node, make_spec, node_dict


@pytest.fixture
def decided():
    spec = make_spec(cpuOffload={"mode": "full", "kvMemory": "4Gi"})
    return spec, size(spec, [make_node()])


def test_without_offloading_the_pod_has_no_cpu_attention_container() -> None:
    """Nothing would connect it (the gateway binds no cpu_attention link with offloading off): it
    would exit after its timeout and be restarted by the kubelet, forever."""
    spec = make_spec(cpuOffload={"mode": "off"})
    d = size(spec, [make_node()])
    assert not d.offload
    pod = build_deployment("svc", spec, d, "abc123")["spec"]["template"]["spec"]
    assert [ct["name"] for ct in pod["containers"]] == ["gateway", "gpu-worker"]


def test_configmap_carries_the_engine_config_as_neo_env(decided) -> None:
    spec, d = decided
    cm = build_configmap("svc", spec, d, generation=3)
    data = cm["data"]
    # immutable and named after its content: a new configuration is a new ConfigMap
    assert cm["kind"] == "ConfigMap" and cm["immutable"] is True
    assert cm["metadata"]["name"] == configmap_name("svc", config_hash(data)) == f"svc-config-{config_hash(data)[:10]}"
    assert cm["metadata"]["annotations"] == {"neo.serving.io/generation": "3"}
    assert all(k.startswith("NEO_") and isinstance(v, str) for k, v in data.items())
    # what a container reads back through envFrom is exactly the decided config
    cfg = NeoConfig.from_args([], env=data)
    assert cfg.cache.num_gpu_blocks == d.gpu_kv_blocks
    assert cfg.cache.num_cpu_blocks == d.cpu_kv_blocks == 2048
    assert cfg.cache.block_size == 16
    assert cfg.scheduler.offload_mode == "full"
    assert cfg.device.cpu_threads == d.cpu_attention_threads
    assert cfg.model.model == "llama-3-8b" and cfg.model.load_format == "dummy"
    assert cfg.http.host == "0.0.0.0" and cfg.http.port == 8000
    # the link: the engine's default ipc:// sockets in the pod's private runtime volume, never tcp
    assert data["NEO_RUNTIME_DIR"] == cfg.ipc.runtime_dir == "/run/neo/link"
    assert not {"NEO_WORKER_ADDR", "NEO_CPU_ATTENTION_ADDR", "NEO_API_KEY"} & set(data)
    assert not any(v.startswith("tcp://") for v in data.values())
    assert cfg.http.shutdown_grace_s == 30 and cfg.http.api_key == ""


def test_gpu_count_maps_to_tensor_parallelism() -> None:
    """gpu.count 2: the worker container gets both GPUs and every container the same rank count, so
    the gpu-worker starts two ranks and the cpu-attention container one process per rank."""
    spec = make_spec(model={"source": "dummy", "name": "llama-3-70b"}, gpu={"count": 2},
                     cpuOffload={"mode": "full", "kvMemory": "32Gi"})
    d = size(spec, [make_node(product="NVIDIA-H100-80GB-HBM3", memory_mib=81559, gpus=2, cpus=64, gbps=200.0)])
    cfg = NeoConfig.from_args([], env=build_configmap("svc", spec, d)["data"])
    assert cfg.device.tensor_parallel_size == 2 and cfg.device.device == "cuda"
    assert cfg.device.cpu_threads == d.cpu_attention_threads
    pod = build_deployment("svc", spec, d, "h")["spec"]["template"]["spec"]
    containers = {ct["name"]: ct for ct in pod["containers"]}
    assert containers["gpu-worker"]["resources"]["limits"] == {**d.requests["gpuWorker"], "nvidia.com/gpu": "2"}
    assert containers["gpu-worker"]["resources"]["requests"] == d.requests["gpuWorker"]


def test_configmap_for_a_model_on_a_volume() -> None:
    spec = make_spec(model={"source": "gguf", "geometry": "smollm2-135m",
                            "volume": {"claimName": "models", "path": "smol/model.gguf"}, "servedName": "smol"})
    d = size(spec, [make_node()])
    cfg = NeoConfig.from_args([], env=build_configmap("s", spec, d)["data"])
    assert cfg.model.model == "/models/smol/model.gguf" and cfg.model.load_format == "gguf"
    assert cfg.model.served_model_name == "smol"


def test_config_hash_changes_with_the_data() -> None:
    assert config_hash({"A": "1"}) == config_hash({"A": "1"})
    assert config_hash({"A": "1"}) != config_hash({"A": "2"})


def _cm(name: str, generation: str | None, created: str) -> dict:
    meta = {"name": name, "creationTimestamp": created}
    if generation is not None:
        meta["annotations"] = {"neo.serving.io/generation": generation}
    return {"metadata": meta}


def test_old_configmaps_pruned_keeping_the_newest_and_the_live_one() -> None:
    cms = [_cm("a", "1", "2024-01-01T00:00:01Z"), _cm("b", "2", "2024-01-01T00:00:02Z"),
           _cm("c", "10", "2024-01-01T00:00:03Z"), _cm("d", "4", "2024-01-01T00:00:04Z"),
           _cm("e", "9", "2024-01-01T00:00:00Z")]  # e: an old configuration wanted again at generation 9
    assert sorted(configmaps_to_prune(cms, keep=set())) == ["a", "b"]  # by generation, not creation
    assert configmaps_to_prune(cms, keep={"a"}) == ["b"]  # the live template's (after a rollback) stays
    assert configmaps_to_prune(cms[:3], keep=set()) == []


def test_deployment_one_pod_three_containers_shared_shm(decided) -> None:
    spec, d = decided
    dep = build_deployment("svc", spec, d, "abc123")
    assert dep["apiVersion"] == "apps/v1" and dep["spec"]["replicas"] == 1
    tpl = dep["spec"]["template"]
    sel = dep["spec"]["selector"]["matchLabels"]
    assert all(tpl["metadata"]["labels"][k] == v for k, v in sel.items())
    assert tpl["metadata"]["annotations"][c.CONFIG_HASH_ANNOTATION] == "abc123"
    pod = tpl["spec"]
    containers = {ct["name"]: ct for ct in pod["containers"]}
    assert list(containers) == ["gateway", "gpu-worker", "cpu-attention"]
    assert containers["gateway"]["command"] == ["neo", "gateway"]
    assert containers["gpu-worker"]["command"] == ["neo", "gpu-worker"]
    assert containers["cpu-attention"]["command"] == ["neo", "cpu-attention"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": d.shm_quantity}
    for ct in containers.values():
        assert {"name": "shm", "mountPath": "/dev/shm"} in ct["volumeMounts"]
        assert {"name": "runtime", "mountPath": "/run/neo"} in ct["volumeMounts"]
        assert ct["envFrom"] == [{"configMapRef": {"name": "svc-config-abc123"}}]
        env = {e["name"]: e["value"] for e in ct["env"]}
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
        assert ct["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "initContainers" not in pod  # dummy weights: nothing to check on a volume
    gw = containers["gateway"]
    assert gw["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/health"
    # limits equal to requests, integer CPUs: a Guaranteed pod the static CPU manager can pin
    assert containers["gpu-worker"]["resources"]["limits"] == {**d.requests["gpuWorker"], "nvidia.com/gpu": "1"}
    assert containers["cpu-attention"]["resources"] == {"requests": d.requests["cpuAttention"],
                                                        "limits": d.requests["cpuAttention"]}
    for ct in pod["containers"]:
        res = ct["resources"]
        assert {k: res["limits"][k] for k in ("cpu", "memory")} == res["requests"], ct["name"]
        assert res["requests"]["cpu"].isdigit(), ct["name"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": c.GPU_PRODUCT_LABEL, "operator": "In", "values": ["NVIDIA-A10G"]}]}]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_deployment_overrides_merge_without_losing_the_gpu_constraint() -> None:
    user_affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    spec = make_spec(
        replicas=3,
        gpu={"count": 2, "resourceName": "nvidia.com/mig-3g.40gb", "nodeSelector": {"pool": "gpu"}},
        resources={"gpuWorker": {"limits": {"memory": "64Gi"}}, "gateway": {"requests": {"cpu": "2"}}},
        podTemplate={"metadata": {"labels": {"team": "x"}, "annotations": {"a": "b"}},
                     "spec": {"affinity": user_affinity, "priorityClassName": "high",
                              "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                              "nodeSelector": {"extra": "1"}}},
        model={"source": "hf", "geometry": "llama-3-8b", "volume": {"claimName": "models", "path": "llama"}},
        cpuOffload={"mode": "off"},
    )
    d = size(spec, [make_node(gpus=2)])
    dep = build_deployment("svc", spec, d, "h")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["template"]["metadata"]["labels"]["team"] == "x"
    assert dep["spec"]["template"]["metadata"]["annotations"]["a"] == "b"
    exprs = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
    assert [e["key"] for e in exprs] == ["zone", c.GPU_PRODUCT_LABEL]
    assert "podAntiAffinity" in pod["affinity"]
    assert user_affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"] == [{"key": "zone", "operator": "In", "values": ["a"]}], "input must not be mutated"
    assert pod["nodeSelector"] == {"pool": "gpu", "extra": "1"}
    assert pod["priorityClassName"] == "high"
    assert {"key": "dedicated", "operator": "Exists"} in pod["tolerations"]
    containers = {ct["name"]: ct for ct in pod["containers"]}
    assert containers["gpu-worker"]["resources"]["limits"] == {"nvidia.com/mig-3g.40gb": "2", "memory": "64Gi",
                                                               "cpu": "4"}
    assert containers["gateway"]["resources"]["requests"]["cpu"] == "2"
    assert containers["gateway"]["resources"]["limits"]["cpu"] == "2", "a raised request raises the limit with it"
    model_vol = next(v for v in pod["volumes"] if v["name"] == "model")
    assert model_vol["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in containers["gpu-worker"]["volumeMounts"]
    assert "cpu-attention" not in containers, "offloading is off"
    (check,) = pod["initContainers"]
    assert check["name"] == "model-check" and check["command"][3] == "/models/llama"


@pytest.mark.parametrize("source,path,make", [("hf", "llama", "dir"), ("gguf", "m/smol.gguf", "file")])
def test_model_check_init_container_runs(tmp_path, source: str, path: str, make: str) -> None:
    """Run the init container's real command against a folder standing in for the volume."""
    import subprocess

    geometry = "smollm2-135m"
    spec = make_spec(model={"source": source, "geometry": geometry, "volume": {"claimName": "models", "path": path}},
                     cpuOffload={"mode": "off"})
    pod = build_deployment("s", spec, size(spec, [make_node()]), "h")["spec"]["template"]["spec"]
    (check,) = pod["initContainers"]
    volume = tmp_path / "models"
    cmd = [part.replace("/models", str(volume)).replace("/dev/termination-log", str(tmp_path / "term"))
           for part in check["command"]]
    volume.mkdir()
    missing = subprocess.run(cmd)
    assert missing.returncode == 1
    assert "not found on PersistentVolumeClaim models; fix spec.model.volume.path" in (tmp_path / "term").read_text()
    target = volume / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.mkdir() if make == "dir" else target.write_bytes(b"GGUF")
    assert subprocess.run(cmd).returncode == 0


def test_service_routes_to_the_gateways(decided) -> None:
    spec, _ = decided
    svc = build_service("svc", spec)
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == {c.NAME_LABEL: "neo", c.INSTANCE_LABEL: "svc"}
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert service_url("svc", "team-a") == "http://svc.team-a.svc:8000"


def test_probe_job_pins_the_node_and_needs_no_api_access() -> None:
    node = node_dict("gpu-node-" + "x" * 80, {c.GPU_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3"})
    job = build_probe_job(node, "neo/cpu-attention:t", "neo-system")
    name = job["metadata"]["name"]
    assert len(name) <= 63 and name.startswith("neo-bw-probe-gpu-node-")
    assert name == probe_job_name(node["metadata"]["name"]) != probe_job_name("gpu-node-" + "x" * 81)
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeName"] == node["metadata"]["name"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["tolerations"] == [{"operator": "Exists"}]
    ct = pod["containers"][0]
    assert ct["command"] == ["/bin/sh", "-c", "exec neo probe-bandwidth --json > /dev/termination-log"]
    assert ct["terminationMessagePath"] == "/dev/termination-log"
    assert ct["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert job["spec"]["template"]["metadata"]["annotations"][c.PROBE_NODE_LABEL] == node["metadata"]["name"]


def test_probe_command_output_parses(tmp_path) -> None:
    """Run the probe Job's own command (as the kubelet would, with the termination-message file mounted
    elsewhere) and parse what it leaves there."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from neo_operator.probejob import PROBE_COMMAND, TERMINATION_LOG

    message = tmp_path / "termination-log"
    cmd = [part.replace(TERMINATION_LOG, str(message)) for part in PROBE_COMMAND]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(cmd, check=True, env=env, timeout=120)
    result = parse_probe_message(message.read_text())
    assert result["read_gbps"] > 0 and result["threads"] >= 1 and isinstance(result["cpu_model"], str)


def test_probe_message_parsing() -> None:
    line = json.dumps({"read_gbps": 98.1, "threads": 16, "cpu_model": "Xeon"})
    assert parse_probe_message("warming up\n" + line + "\n")["read_gbps"] == 98.1
    with pytest.raises(ProbeResultError):
        parse_probe_message("Traceback: boom")
    with pytest.raises(ProbeResultError):
        parse_probe_message('{"read_gbps": 0}')
    record = probe_record({"read_gbps": 98.14, "threads": 16, "cpu_model": "Xeon"}, now=0)
    assert json.loads(record) == {"read_gbps": 98.1, "threads": 16, "cpu_model": "Xeon",
                                  "measured_at": "1970-01-01T00:00:00Z"}
    assert parse_probe_record(record) == (98.1, 16)


def test_probe_pod_result_only_for_succeeded_pods() -> None:
    msg = json.dumps({"read_gbps": 50.0, "threads": 8})
    running = {"status": {"phase": "Running"}}
    done = {"status": {"phase": "Succeeded", "containerStatuses": [
        {"name": "probe", "state": {"terminated": {"exitCode": 0, "message": msg}}}]}}
    assert probe_pod_result(running) is None
    assert probe_pod_result(done) == {"read_gbps": 50.0, "threads": 8}
    with pytest.raises(ProbeResultError):
        probe_pod_result({"status": {"phase": "Succeeded", "containerStatuses": []}})
