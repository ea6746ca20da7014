"""hf:// models against a real API server: the model-inspection Job, its result or failure in the
NeoService's status, and the engine pod's download init container, with a local stand-in for the Hub
(tests/support/hub_standin.py). There is no kubelet: the job controller creates the inspection pod,
and ``fake_kubelet_run_inspection`` plays the kubelet: it runs the pod's real command on this
machine (env resolved from the real Secret, mounts mapped to temp folders) and writes the pod status
with the termination message the container wrote, as a kubelet would."""

from __future__ import annotations

import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from neo_operator import constants as c
from neo_operator import model_inspection as mi
from neo_operator.model_fetch import FetchFailure
from neo_operator.model_source import INIT_CONTAINER
from neo_operator.podhealth import CONDITION as PODS_INITIALIZED

from kube_cluster import Cluster, Operator, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from hub_standin import StandinRepo, hub_standin, run_container_locally  # noqa: E402

pytestmark = pytest.mark.k8s

NS = "team-hub"
NODE = "gpu-hub-a10g"
TOKEN = "hf_standin_token"
CONFIG = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "num_hidden_layers": 28,
          "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
          "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": True}
FILES = {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": os.urandom(2048), "tokenizer.json": b"{}"}
REPO = StandinRepo("acme/qwen-mini", FILES, refs=("main", "v1"))


@pytest.fixture(scope="module")
def env(cluster: Cluster, operator: Operator) -> Any:
    core = client.CoreV1Api(cluster.api)
    try:
        core.create_namespace({"metadata": {"name": NS}})
    except ApiException as exc:
        assert exc.status == 409
    for name, token in (("hf-token", TOKEN), ("hf-wrong", "hf_not_the_token")):
        try:
            core.create_namespaced_secret(NS, {"metadata": {"name": name}, "stringData": {"token": token}})
        except ApiException as exc:
            assert exc.status == 409
    labels = {"kubernetes.io/hostname": NODE, c.GPU_PRODUCT_LABEL: "NVIDIA-A10G", c.GPU_COUNT_LABEL: "1",
              c.GPU_MEMORY_LABEL: "23028"}
    try:
        core.create_node({"metadata": {"name": NODE, "labels": labels}})
        resources = {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "1"}
        core.patch_node_status(NODE, {"status": {"capacity": resources, "allocatable": resources}})
    except ApiException as exc:
        assert exc.status == 409
    with hub_standin([REPO], TOKEN) as hub:
        yield {"core": core, "apps": client.AppsV1Api(cluster.api), "batch": client.BatchV1Api(cluster.api),
               "custom": client.CustomObjectsApi(cluster.api), "hub": hub, "operator": operator}


def create(env: dict, name: str, source: str, secret: str) -> None:
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"source": source, "hub": {"endpoint": env["hub"].url,
                                                         "tokenSecretRef": {"name": secret, "key": "token"}}},
                     "gpu": {"products": ["NVIDIA-A10G"]}, "cpuOffload": {"mode": "off"}}}
    env["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, body)


def condition(env: dict, name: str, type_: str) -> dict | None:
    obj = env["custom"].get_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, name)
    return next((x for x in (obj.get("status") or {}).get("conditions") or [] if x["type"] == type_), None)


def secrets_of(env: dict) -> dict[tuple[str, str], str]:
    out = {}
    for s in env["core"].list_namespaced_secret(NS).items:
        for key, value in (s.data or {}).items():
            out[(s.metadata.name, key)] = base64.b64decode(value).decode()
    return out


def fake_kubelet_run_inspection(env: dict, name: str) -> dict:
    """The kubelet's part for the inspection pod of NeoService ``name``: run its container's command
    here, then write the pod status (terminated, exit code, the termination message) the way a kubelet
    reports a finished container. Returns the result line."""
    core = env["core"]

    def pod():
        for p in core.list_namespaced_pod(NS, label_selector=f"{c.INSTANCE_LABEL}={name},"
                                                               f"{c.COMPONENT_LABEL}={mi.COMPONENT}").items:
            if not p.status.container_statuses:
                return p
        return None

    p = wait_for(pod, timeout=30, what=f"job controller to create the inspection pod of {name}")
    container = core.api_client.sanitize_for_serialization(p.spec.containers[0])
    with tempfile.TemporaryDirectory() as tmp:
        code, message = run_container_locally(container, secrets_of(env), {"/tmp": tmp})
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    core.patch_namespaced_pod_status(p.metadata.name, NS, {"status": {
        "phase": "Succeeded" if code == 0 else "Failed",
        "containerStatuses": [{
            "name": container["name"], "image": container["image"], "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                     "message": message, "startedAt": now, "finishedAt": now}},
        }],
    }})
    return json.loads(message)


def test_an_hf_model_is_inspected_then_downloaded_by_the_init_container(env: dict) -> None:
    create(env, "qwen", "hf://acme/qwen-mini@v1", "hf-token")
    inspecting = wait_for(lambda: (condition(env, "qwen", "ModelAvailable") or {}).get("reason") == "Inspecting",
                          what="ModelAvailable=False Inspecting while the Job runs")
    assert inspecting
    assert not exists_deployment(env, "qwen"), "nothing is sized before the geometry is known"
    result = fake_kubelet_run_inspection(env, "qwen")
    assert result["revision"] == REPO.commit, result
    ok = wait_for(lambda: (cnd := condition(env, "qwen", "ModelAvailable")) and cnd["status"] == "True" and cnd,
                  what="ModelAvailable=True")
    assert REPO.commit in ok["message"]
    obj = env["custom"].get_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "qwen")
    assert obj["status"]["model"]["revision"] == REPO.commit
    assert obj["status"]["model"]["geometry"]["num_layers"] == 28
    # sized from the model's own config.json: 28 layers, 2 KV heads of 128, bf16, 16-token blocks
    assert obj["status"]["sizing"]["kvBytesPerBlock"] == 16 * 2 * 28 * 2 * 128 * 2
    dep = wait_for(lambda: env["apps"].read_namespaced_deployment("qwen", NS), what="the Deployment")
    wait_for(lambda: not env["batch"].list_namespaced_job(NS, label_selector=f"{c.INSTANCE_LABEL}=qwen").items,
             what="the finished inspection Job deleted")
    (init,) = [env["core"].api_client.sanitize_for_serialization(ct) for ct in dep.spec.template.spec.init_containers]
    assert init["name"] == INIT_CONTAINER and f"hf://acme/qwen-mini@{REPO.commit}" in init["command"]
    # the init container's real command, with the Secret's token, against the stand-in
    with tempfile.TemporaryDirectory() as tmp:
        code, message = run_container_locally(init, secrets_of(env), {c.MODEL_MOUNT: f"{tmp}/models", "/tmp": f"{tmp}/t"})
        assert code == 0, message
        for path, data in FILES.items():
            assert Path(tmp, "models", "acme", "qwen-mini", path).read_bytes() == data


def exists_deployment(env: dict, name: str) -> bool:
    try:
        env["apps"].read_namespaced_deployment(name, NS)
        return True
    except ApiException as exc:
        assert exc.status == 404
        return False


@pytest.mark.parametrize("name, source, secret, reason, fix", [
    ("qwen-bad-token", "hf://acme/qwen-mini@v1", "hf-wrong", FetchFailure.UNAUTHORIZED, "spec.model.hub.tokenSecretRef"),
    ("qwen-no-rev", "hf://acme/qwen-mini@v9", "hf-token", FetchFailure.REVISION_NOT_FOUND, "@revision of spec.model.source"),
])
def test_hub_failures_become_conditions(env: dict, name: str, source: str, secret: str, reason: FetchFailure,
                                        fix: str) -> None:
    create(env, name, source, secret)
    result = fake_kubelet_run_inspection(env, name)
    assert result["reason"] == reason.value, result
    cnd = wait_for(lambda: (x := condition(env, name, "ModelAvailable")) and x["reason"] == reason.value and x,
                   what=f"ModelAvailable=False {reason.value}")
    assert cnd["status"] == "False" and fix in cnd["message"], cnd["message"]
    ready = condition(env, name, "Ready")
    assert ready["status"] == "False" and ready["reason"] == reason.value
    time.sleep(2)  # the failed Job is replaced (backoff 1 s here): the condition keeps saying why
    cnd = condition(env, name, "ModelAvailable")
    assert cnd["reason"] == reason.value and fix in cnd["message"], cnd
    assert not exists_deployment(env, name), "a model that cannot be fetched leaves no children"


def fake_replicaset_pod(env: dict, name: str) -> dict:
    """The ReplicaSet controller's part (this cluster runs none): one pod from the Deployment's template."""
    dep = env["apps"].read_namespaced_deployment(name, NS)
    template = env["core"].api_client.sanitize_for_serialization(dep.spec.template)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{name}-7c9d5-x2k4p", "namespace": NS, "labels": template["metadata"]["labels"]},
           "spec": template["spec"]}
    env["core"].create_namespaced_pod(NS, pod)
    return pod


def fake_kubelet_run_download(env: dict, pod: dict, restarts: int) -> int:
    """The kubelet's part for the engine pod: run its model-download init container's real command here
    (the Secret's current token, against the Hub stand-in), then write the pod status as a kubelet does:
    a failed init container in CrashLoopBackOff with the last run's exit code and termination message,
    or a finished one and the engine containers running."""
    (init,) = pod["spec"]["initContainers"]
    with tempfile.TemporaryDirectory() as tmp:
        code, message = run_container_locally(init, secrets_of(env), {c.MODEL_MOUNT: f"{tmp}/models", "/tmp": f"{tmp}/t"})
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
           "startedAt": now, "finishedAt": now}
    base = {"name": init["name"], "image": init["image"], "imageID": "", "restartCount": restarts}
    if code:
        init_status = {**base, "ready": False, "lastState": {"terminated": run}, "state": {"waiting": {
            "reason": "CrashLoopBackOff",
            "message": f"back-off 10s restarting failed container={init['name']} pod={pod['metadata']['name']}"}}}
        containers = {"state": {"waiting": {"reason": "PodInitializing"}}, "ready": False}
        phase = "Pending"
    else:
        init_status = {**base, "ready": True, "state": {"terminated": run}}
        containers = {"state": {"running": {"startedAt": now}}, "ready": False}
        phase = "Running"
    env["core"].patch_namespaced_pod_status(pod["metadata"]["name"], NS, {"status": {
        "phase": phase, "initContainerStatuses": [init_status],
        "containerStatuses": [{"name": ct["name"], "image": ct["image"], "imageID": "", "restartCount": 0, **containers}
                              for ct in pod["spec"]["containers"]]}})
    return code


def test_a_failing_model_download_becomes_a_condition_until_the_pods_run(env: dict) -> None:
    """The token is revoked after the inspection succeeded: the engine pod's download init container
    crash-loops. That shows on the NeoService (PodsInitialized=False naming the pod, the Secret and the
    Hub's answer; Ready and phase follow; a Warning Event), not only in `kubectl describe pod`, and
    clears once the fixed token lets the download finish."""
    name = "qwen-revoked"
    env["core"].create_namespaced_secret(NS, {"metadata": {"name": "hf-revocable"}, "stringData": {"token": TOKEN}})
    create(env, name, "hf://acme/qwen-mini@v1", "hf-revocable")
    assert fake_kubelet_run_inspection(env, name)["revision"] == REPO.commit
    wait_for(lambda: exists_deployment(env, name), what="the Deployment")
    env["core"].patch_namespaced_secret("hf-revocable", NS, {"stringData": {"token": "hf_revoked"}})
    pod = fake_replicaset_pod(env, name)
    assert fake_kubelet_run_download(env, pod, restarts=1) != 0
    cnd = wait_for(lambda: (x := condition(env, name, PODS_INITIALIZED)) and x["status"] == "False" and x,
                   what="PodsInitialized=False")
    assert cnd["reason"] == FetchFailure.UNAUTHORIZED.value, cnd
    for words in (pod["metadata"]["name"], INIT_CONTAINER, "CrashLoopBackOff", "exit code 1",
                  "'hf-revocable' (spec.model.hub.tokenSecretRef)", "401"):
        assert words in cnd["message"], (words, cnd["message"])
    obj = env["custom"].get_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, name)
    assert obj["status"]["phase"] == "Failed"
    assert condition(env, name, "Ready")["reason"] == FetchFailure.UNAUTHORIZED.value
    wait_for(lambda: [e for e in env["core"].list_namespaced_event(NS, field_selector=f"involvedObject.name={name}").items
                      if e.type == "Warning" and e.reason == FetchFailure.UNAUTHORIZED.value],
             what="a Warning event for the failing download")
    # the token is fixed; the kubelet's next restart of the init container downloads the model
    env["core"].patch_namespaced_secret("hf-revocable", NS, {"stringData": {"token": TOKEN}})
    assert fake_kubelet_run_download(env, pod, restarts=2) == 0
    cnd = wait_for(lambda: (x := condition(env, name, PODS_INITIALIZED)) and x["status"] == "True" and x,
                   what="PodsInitialized=True once the download finished")
    assert cnd["reason"] == "Initialized", cnd
    assert condition(env, name, "Ready")["reason"] != FetchFailure.UNAUTHORIZED.value
