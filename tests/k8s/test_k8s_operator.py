"""The operator against a real API server: children, status, updates, garbage collection, bad input,
and the bandwidth probe flow. All tests share one control plane and one operator process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from neo_operator import constants as c
from neo_operator.configmap import KEPT_CONFIGMAPS, config_hash
from neo_operator.nodes import node_facts
from neo_operator.probejob import probe_job_name
from neo_operator.sizing import size
from neo_operator.spec import parse_spec

from kube_cluster import ADMIN_TOKEN, OPERATOR_NAMESPACE, PULL_SECRET, Cluster, Operator, wait_for

pytestmark = pytest.mark.k8s

NS = "team-a"
IMAGES = {"gateway": "neo/gateway:test", "gpuWorker": "neo/gpu-worker:test", "cpuAttention": "neo/cpu-attention:test"}
A10G = "NVIDIA-A10G"


@pytest.fixture(scope="module")
def apis(cluster: Cluster, operator: Operator) -> dict[str, Any]:
    api = cluster.api
    core = client.CoreV1Api(api)
    try:
        core.create_namespace({"metadata": {"name": NS}})
    except ApiException as exc:
        assert exc.status == 409
    return {"core": core, "apps": client.AppsV1Api(api), "batch": client.BatchV1Api(api),
            "custom": client.CustomObjectsApi(api), "api": api, "operator": operator, "cluster": cluster}


def make_node(core: client.CoreV1Api, name: str, product: str | None, memory_mib: int | None = None,
              gpus: int = 1, cpus: str = "32", memory: str = "128Gi", annotations: dict | None = None) -> dict:
    labels = {"kubernetes.io/hostname": name}
    if product:
        labels[c.GPU_PRODUCT_LABEL] = product
        labels[c.GPU_COUNT_LABEL] = str(gpus)
        if memory_mib:
            labels[c.GPU_MEMORY_LABEL] = str(memory_mib)
    core.create_node({"metadata": {"name": name, "labels": labels, "annotations": annotations or {}}})
    resources = {"cpu": cpus, "memory": memory, "pods": "110"}
    if product:
        resources["nvidia.com/gpu"] = str(gpus)
    core.patch_node_status(name, {"status": {"capacity": resources, "allocatable": resources}})
    return core.api_client.sanitize_for_serialization(core.read_node(name))


def neoservice(name: str, **spec: Any) -> dict:
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name, "namespace": NS}, "spec": spec}


def get_ns(apis: dict, name: str) -> dict:
    return apis["custom"].get_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, name)


def cond(obj: dict, type_: str) -> dict | None:
    return next((x for x in (obj.get("status") or {}).get("conditions") or [] if x["type"] == type_), None)


def exists(read, *args) -> bool:
    try:
        read(*args)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def configmaps(apis: dict, name: str) -> dict[str, Any]:
    """The engine ConfigMaps of NeoService ``name`` (one per configuration), by name."""
    items = apis["core"].list_namespaced_config_map(
        NS, label_selector=f"{c.INSTANCE_LABEL}={name},{c.COMPONENT_LABEL}=config").items
    return {cm.metadata.name: cm for cm in items}


def template_configmap(dep: Any) -> str:
    """The ConfigMap a Deployment's pod template names (every container reads the same one)."""
    names = {src.config_map_ref.name for ct in dep.spec.template.spec.containers for src in ct.env_from or []
             if src.config_map_ref}
    (name,) = names
    return name


def current_configmap(apis: dict, name: str) -> Any:
    """The ConfigMap the live Deployment of ``name`` runs with."""
    return apis["core"].read_namespaced_config_map(template_configmap(apis["apps"].read_namespaced_deployment(name, NS)), NS)


def children_exist(apis: dict, name: str) -> dict[str, bool]:
    return {"configmap": bool(configmaps(apis, name)),
            "service": exists(apis["core"].read_namespaced_service, name, NS),
            "deployment": exists(apis["apps"].read_namespaced_deployment, name, NS),
            "networkpolicy": exists(client.NetworkingV1Api(apis["api"]).read_namespaced_network_policy, name, NS),
            "poddisruptionbudget": exists(read_pdb, apis, name)}


def read_pdb(apis: dict, name: str) -> dict:
    """The PodDisruptionBudget ``name`` (policy/v1beta1: what 1.20 serves)."""
    return apis["custom"].get_namespaced_custom_object("policy", "v1beta1", NS, "poddisruptionbudgets", name)


def fake_kubelet_complete_probe(apis: dict, node: str, read_gbps: float | None = None, threads: int = 0) -> str:
    """Plays the kubelet's part, which this control plane lacks: marks the probe pod the job controller
    created for ``node`` as finished, with the probe's JSON line as its termination message. With
    ``read_gbps`` None it runs the pod's real command on this machine (the termination-message file
    mounted at a temp path, as the kubelet would) and reports what it wrote; returns the message."""
    core = apis["core"]
    job = probe_job_name(node)

    def pod():
        # the pod of the Job now under that name: a replaced Job's pod may linger with the same labels
        uid = apis["batch"].read_namespaced_job(job, OPERATOR_NAMESPACE).metadata.uid
        pods = [q for q in core.list_namespaced_pod(OPERATOR_NAMESPACE, label_selector=f"job-name={job}").items
                if q.metadata.deletion_timestamp is None
                and any(ref.uid == uid for ref in q.metadata.owner_references or [])]
        return pods[0] if pods else None

    p = wait_for(pod, timeout=30, what=f"job controller to create the probe pod of {job}")
    assert p.spec.node_name == node
    if read_gbps is None:
        ct = p.spec.containers[0]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "termination-log")
            cmd = [part.replace(ct.termination_message_path, path) for part in ct.command]
            env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
            subprocess.run(cmd, check=True, env=env, timeout=120)
            message = open(path).read()
    else:
        message = json.dumps({"read_gbps": read_gbps, "threads": threads, "cpu_model": "Fake CPU"})
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    core.patch_namespaced_pod_status(p.metadata.name, OPERATOR_NAMESPACE, {"status": {
        "phase": "Succeeded",
        "containerStatuses": [{
            "name": "probe", "image": p.spec.containers[0].image, "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message,
                                     "startedAt": now, "finishedAt": now}},
        }],
    }})
    return message


def probe_result(apis: dict, node: str) -> dict | None:
    """The node's entry in the probe results ConfigMap of the operator's namespace (None: not yet)."""
    try:
        cm = apis["core"].read_namespaced_config_map(c.PROBE_RESULTS_CONFIGMAP, OPERATOR_NAMESPACE)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    raw = (cm.data or {}).get(node)
    return json.loads(raw) if raw else None


def measured_a10g(apis: dict) -> dict:
    """The A10G node with its probe result recorded (61.5 GB/s over 32 threads), whichever test needs it
    first: the probe test measures it, any test run alone does the same here."""
    if not exists(apis["core"].read_node, "gpu-a10g-1"):
        make_node(apis["core"], "gpu-a10g-1", A10G, 23028, gpus=1, cpus="32")
    if probe_result(apis, "gpu-a10g-1") is None:
        wait_for(lambda: apis["batch"].read_namespaced_job(probe_job_name("gpu-a10g-1"), OPERATOR_NAMESPACE),
                 what="probe job for the A10G node")
        fake_kubelet_complete_probe(apis, "gpu-a10g-1", 61.5, 32)
    return wait_for(lambda: probe_result(apis, "gpu-a10g-1"), what="A10G probe result recorded")


def served(apis: dict, name: str, spec: dict) -> dict:
    """The NeoService ``name`` (created with ``spec`` unless it exists), once sized with children."""
    if not exists(apis["custom"].get_namespaced_custom_object, c.GROUP, c.VERSION, NS, c.PLURAL, name):
        apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice(name, **spec))
    obj = wait_for(lambda: (o := get_ns(apis, name)).get("status", {}).get("sizing") and o, what=f"{name} sized")
    wait_for(lambda: all(children_exist(apis, name).values()), what=f"children of {name}")
    return obj


@pytest.fixture
def llama(apis: dict) -> dict:
    """The NeoService most tests follow; created by the first test that needs it."""
    measured_a10g(apis)
    return served(apis, "llama", SPEC)


def test_probe_job_for_gpu_nodes_and_result_recorded(apis: dict) -> None:
    core, batch = apis["core"], apis["batch"]
    make_node(core, "cpu-only-1", None)
    make_node(core, "gpu-a10g-1", A10G, 23028, gpus=1, cpus="32")
    job = wait_for(lambda: batch.read_namespaced_job(probe_job_name("gpu-a10g-1"), OPERATOR_NAMESPACE),
                   what="probe job for the GPU node")
    pod = job.spec.template.spec
    assert pod.node_name == "gpu-a10g-1"
    assert "neo probe-bandwidth --json" in " ".join(pod.containers[0].command)
    assert pod.containers[0].image == "neo/cpu-attention:test"
    assert job.metadata.owner_references[0].kind == "Node"
    assert not exists(batch.read_namespaced_job, probe_job_name("cpu-only-1"), OPERATOR_NAMESPACE)

    fake_kubelet_complete_probe(apis, "gpu-a10g-1", 61.5, 32)
    detail = wait_for(lambda: probe_result(apis, "gpu-a10g-1"), what="probe result recorded in the ConfigMap")
    assert detail["read_gbps"] == 61.5 and detail["threads"] == 32 and detail["cpu_model"] == "Fake CPU"
    # recorded without touching the Node (the operator may only read Nodes)
    assert c.READ_GBPS_ANNOTATION not in (core.read_node("gpu-a10g-1").metadata.annotations or {})
    wait_for(lambda: not exists(batch.read_namespaced_job, probe_job_name("gpu-a10g-1"), OPERATOR_NAMESPACE),
             what="probe job removed after recording")


SPEC = {"model": {"source": "dummy", "name": "llama-3-8b"}, "gpu": {"products": [A10G]},
        "cpuOffload": {"mode": "auto", "kvMemory": "16Gi"}}


def expected_decision(apis: dict, spec: dict):
    """The sizing the operator should reach, from the same nodes through the pure functions."""
    nodes = [apis["api"].sanitize_for_serialization(n) for n in apis["core"].list_node().items]
    nodes = [n for n in nodes if (n["metadata"].get("labels") or {}).get(c.GPU_PRODUCT_LABEL) in spec["gpu"]["products"]]
    cm = apis["core"].read_namespaced_config_map(c.PROBE_RESULTS_CONFIGMAP, OPERATOR_NAMESPACE)
    return size(parse_spec(spec, IMAGES), [node_facts(n, probe_results=cm.data or {}) for n in nodes])


def test_neoservice_creates_adopted_children_with_computed_sizes(apis: dict) -> None:
    custom, core, appsv1 = apis["custom"], apis["core"], apis["apps"]
    measured_a10g(apis)
    custom.create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice("llama", **SPEC))
    obj = wait_for(lambda: (o := get_ns(apis, "llama")).get("status", {}).get("sizing") and o, what="sizing in status")
    decision = expected_decision(apis, obj["spec"])
    sizing = obj["status"]["sizing"]
    assert sizing["gpuKvBlocks"] == decision.gpu_kv_blocks > 0
    assert sizing["cpuKvBlocks"] == decision.cpu_kv_blocks
    assert sizing["offload"] is decision.offload is True  # A10G with 61.5 GB/s over 32 cores: worth it
    assert sizing["hostReadGBps"] == 61.5 and sizing["shmSize"] == decision.shm_quantity
    assert cond(obj, "Sized")["status"] == "True" and cond(obj, "SpecValid")["status"] == "True"
    assert obj["status"]["url"] == f"http://llama.{NS}.svc:8000"
    assert obj["status"]["gpu"] == f"1x {A10G}" and obj["status"]["observedGeneration"] == 1
    assert obj["status"]["phase"] == "Deploying"  # no pods in this cluster until the test writes status

    uid = obj["metadata"]["uid"]
    dep = appsv1.read_namespaced_deployment("llama", NS)
    cm = core.read_namespaced_config_map(template_configmap(dep), NS)
    assert cm.immutable is True and cm.metadata.name == f"llama-config-{config_hash(cm.data)[:10]}"
    svc = core.read_namespaced_service("llama", NS)
    policy = client.NetworkingV1Api(apis["api"]).read_namespaced_network_policy("llama", NS)
    for child in (cm, dep, svc, policy):
        (ref,) = child.metadata.owner_references
        assert (ref.uid, ref.kind, ref.controller) == (uid, c.KIND, True)
    assert cm.data["NEO_NUM_GPU_BLOCKS"] == str(decision.gpu_kv_blocks)
    assert cm.data["NEO_NUM_CPU_BLOCKS"] == str(decision.cpu_kv_blocks)
    assert cm.data["NEO_OFFLOAD_MODE"] == "auto"
    assert cm.data["NEO_CPU_THREADS"] == str(decision.cpu_attention_threads)
    pod = dep.spec.template.spec
    assert [ct.name for ct in pod.containers] == ["gateway", "gpu-worker", "cpu-attention"]
    shm = next(v for v in pod.volumes if v.name == "shm")
    assert shm.empty_dir.medium == "Memory" and shm.empty_dir.size_limit == decision.shm_quantity
    cpu_att = pod.containers[2]
    assert cpu_att.resources.requests == decision.requests["cpuAttention"]
    assert pod.containers[1].resources.limits == {**decision.requests["gpuWorker"], "nvidia.com/gpu": "1"}
    assert cpu_att.resources.limits == decision.requests["cpuAttention"], "limits = requests: Guaranteed QoS"
    assert svc.spec.selector == dep.spec.selector.match_labels
    assert policy.spec.pod_selector.match_labels == dep.spec.selector.match_labels


def _set_deployment_status(apis: dict, name: str, ready: int) -> None:
    dep = apis["apps"].read_namespaced_deployment(name, NS)
    n = dep.spec.replicas
    apis["apps"].patch_namespaced_deployment_status(name, NS, {"status": {
        "observedGeneration": dep.metadata.generation, "replicas": n, "updatedReplicas": n,
        "readyReplicas": ready, "availableReplicas": ready}})


def printer_columns(apis: dict, name: str) -> dict[str, Any]:
    """The row `kubectl get neoservice` shows, as the API server renders it (server-side Table)."""
    import ssl
    import urllib.request

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    url = f"{apis['cluster'].server}/apis/{c.GROUP}/{c.VERSION}/namespaces/{NS}/{c.PLURAL}/{name}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                               "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
        table = json.load(resp)
    names = [col["name"] for col in table["columnDefinitions"]]
    return dict(zip(names, table["rows"][0]["cells"]))


def test_status_follows_the_deployment(apis: dict, llama: dict) -> None:
    _set_deployment_status(apis, "llama", ready=1)
    obj = wait_for(lambda: (o := get_ns(apis, "llama"))["status"].get("phase") == "Ready" and o, what="phase Ready")
    assert obj["status"]["readyReplicas"] == 1 and obj["status"]["replicas"] == 1
    assert cond(obj, "Ready")["status"] == "True" and cond(obj, "WorkloadReady")["reason"] == "AllReplicasReady"
    row = printer_columns(apis, "llama")
    assert row["Ready"] == "True" and row["Phase"] == "Ready" and row["GPU"] == f"1x {A10G}"
    assert row["Offload"] == f"auto ({obj['status']['sizing']['cpuKvBlocks']} CPU blocks)"
    assert row["URL"] == f"http://llama.{NS}.svc:8000" and row["Age"]
    _set_deployment_status(apis, "llama", ready=0)
    obj = wait_for(lambda: (o := get_ns(apis, "llama"))["status"].get("phase") == "Deploying" and o,
                   what="phase back to Deploying")
    assert cond(obj, "Ready")["status"] == "False" and obj["status"]["readyReplicas"] == 0


def test_spec_change_rolls_the_children(apis: dict, llama: dict) -> None:
    custom, core, appsv1 = apis["custom"], apis["core"], apis["apps"]
    before = appsv1.read_namespaced_deployment("llama", NS)
    old_hash = before.spec.template.metadata.annotations[c.CONFIG_HASH_ANNOTATION]
    custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "llama",
                                          {"spec": {"engine": {"maxNumSeqs": 64}, "cpuOffload": {"kvMemory": "8Gi"}}})
    cm = wait_for(lambda: (m := current_configmap(apis, "llama")).data["NEO_MAX_NUM_SEQS"] == "64" and m,
                  what="a new ConfigMap in the pod template")
    assert cm.data["NEO_NUM_CPU_BLOCKS"] == str((8 << 30) // (2 << 20))
    dep = wait_for(lambda: (d := appsv1.read_namespaced_deployment("llama", NS)).spec.template.metadata.annotations[
        c.CONFIG_HASH_ANNOTATION] != old_hash and d, what="pod template carries the new config hash")
    assert dep.metadata.generation > before.metadata.generation
    generation = get_ns(apis, "llama")["metadata"]["generation"]
    obj = wait_for(lambda: (o := get_ns(apis, "llama"))["status"].get("observedGeneration") == generation and o,
                   what=f"observedGeneration {generation}")
    assert obj["status"]["sizing"]["cpuKvBlocks"] == 4096

    # the scale subresource (what an HPA uses) drives the Deployment's replicas
    custom.patch_namespaced_custom_object_scale(c.GROUP, c.VERSION, NS, c.PLURAL, "llama", {"spec": {"replicas": 2}})
    wait_for(lambda: appsv1.read_namespaced_deployment("llama", NS).spec.replicas == 2, what="Deployment scaled to 2")
    scale = custom.get_namespaced_custom_object_scale(c.GROUP, c.VERSION, NS, c.PLURAL, "llama")
    assert scale["status"]["selector"] == "app.kubernetes.io/instance=llama,app.kubernetes.io/name=neo"


def test_operator_restart_resumes_without_churn(apis: dict, llama: dict) -> None:
    appsv1, core = apis["apps"], apis["core"]
    dep_rv = appsv1.read_namespaced_deployment("llama", NS).metadata.resource_version
    cm_rv = current_configmap(apis, "llama").metadata.resource_version
    apis["operator"].restart()
    # the resumed handler has run once it leaves its mark (kopf's progress annotations) or a later
    # spec change is handled; give it time, then check nothing was rewritten
    time.sleep(3)
    assert appsv1.read_namespaced_deployment("llama", NS).metadata.resource_version == dep_rv
    assert current_configmap(apis, "llama").metadata.resource_version == cm_rv
    # and the restarted operator still reacts
    apis["custom"].patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "llama",
                                                  {"spec": {"engine": {"logLevel": "debug"}}})
    wait_for(lambda: current_configmap(apis, "llama").data["NEO_LOG_LEVEL"] == "debug",
             what="restarted operator handles a spec change")


def test_a_deleted_deployment_is_recreated(apis: dict) -> None:
    """Deleted by hand, twice, once right after a spec change (the spec handler's write then races the
    recreation): it comes back each time, with the latest template."""
    appsv1 = apis["apps"]
    measured_a10g(apis)
    served(apis, "phoenix", {**SPEC, "replicas": 2})
    for change in (None, {"engine": {"maxNumSeqs": 48}}):
        if change:
            apis["custom"].patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "phoenix", {"spec": change})
        old = appsv1.read_namespaced_deployment("phoenix", NS)
        appsv1.delete_namespaced_deployment("phoenix", NS)
        new = wait_for(lambda: (d := appsv1.read_namespaced_deployment("phoenix", NS)).metadata.uid != old.metadata.uid
                       and d, what="Deployment recreated")
        assert new.spec.replicas == 2
        wait_for(lambda: current_configmap(apis, "phoenix").data["NEO_MAX_NUM_SEQS"] == str(
            (change or {}).get("engine", {}).get("maxNumSeqs", 256)), what="recreated Deployment carries the latest config")
    # The recreation pass itself refused for a while: a full ResourceQuota makes the quota admission
    # refuse every Deployment create in the namespace (403 "exceeded quota"; this control plane has no
    # quota controller, so the test writes the quota's usage itself). Kopf never retries an event
    # handler, so the one pass the DELETED event started was the only one (a 409 from a write racing the
    # spec handler ended it the same way); it must be retried until the write goes through.
    old = appsv1.read_namespaced_deployment("phoenix", NS)
    full = {"count/deployments.apps": "0"}
    apis["core"].create_namespaced_resource_quota(NS, {"metadata": {"name": "hold-deployments"}, "spec": {"hard": full}})
    apis["core"].patch_namespaced_resource_quota_status("hold-deployments", NS, {"status": {"hard": full, "used": full}})
    time.sleep(0.5)  # the quota admission reads quotas through an informer
    try:
        appsv1.delete_namespaced_deployment("phoenix", NS)
        time.sleep(2)
        assert not exists(appsv1.read_namespaced_deployment, "phoenix", NS)  # refused while the quota holds
        assert "hold-deployments" in apis["operator"].tail(200)
    finally:
        apis["core"].delete_namespaced_resource_quota("hold-deployments", NS)
    try:
        wait_for(lambda: appsv1.read_namespaced_deployment("phoenix", NS).metadata.uid != old.metadata.uid,
                 what="Deployment recreated once the quota went away")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{apis['operator'].tail()}") from None
    apis["custom"].delete_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "phoenix")


def test_deleting_the_neoservice_garbage_collects_children(apis: dict, llama: dict) -> None:
    assert all(children_exist(apis, "llama").values())
    apis["custom"].delete_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "llama")
    wait_for(lambda: not any(children_exist(apis, "llama").values()), timeout=60,
             what="garbage collection of ConfigMap, Service, Deployment and NetworkPolicy")


def test_schema_rejects_what_it_can(apis: dict) -> None:
    for spec in ({"model": {"name": "llama-3-8b"}, "cpuOffload": {"mode": "sometimes"}},
                 {"model": {"name": "llama-3-8b"}, "cpuOffload": {"kvMemory": "lots"}},
                 {"model": {"name": "llama-3-8b"}, "replicas": -1},
                 {"model": {"name": "llama-3-8b", "source": "pytorch"}}):
        with pytest.raises(ApiException) as info:
            apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice("bad", **spec))
        assert info.value.status == 422, info.value.body


BAD_INPUT = [
    ("unknown-gpu", {"model": {"name": "llama-3-8b"}, "gpu": {"products": ["NVIDIA-Mystery-1"]},
                     "cpuOffload": {"mode": "off"}}, "Sized", "UnknownGpuProduct", "spec.gpu.memoryBandwidthGBps"),
    ("kv-too-big", {"model": {"name": "llama-3-8b"}, "gpu": {"products": [A10G]},
                    "cpuOffload": {"mode": "full", "kvMemory": "10Ti"}}, "Sized", "KvMemoryExceedsNode",
     "lower spec.cpuOffload.kvMemory"),
    ("no-model-file", {"model": {"source": "gguf", "geometry": "smollm2-135m",
                                 "volume": {"claimName": "models", "path": "smol.gguf"}}},
     "ModelAvailable", "ModelMissing", "PersistentVolumeClaim 'models' not found"),
    ("unknown-geometry", {"model": {"name": "gpt-17"}}, "SpecValid", "UnknownModel", "llama-3-8b"),
    ("too-big-model", {"model": {"name": "llama-3-70b"}, "gpu": {"products": [A10G]}, "cpuOffload": {"mode": "off"}},
     "Sized", "ModelDoesNotFit", "spec.gpu.count"),
]


def test_bad_input_becomes_conditions_without_children(apis: dict) -> None:
    measured_a10g(apis)
    make_node(apis["core"], "gpu-mystery-1", "NVIDIA-Mystery-1", 32768, annotations={c.READ_GBPS_ANNOTATION: "50"})
    for name, spec, _, _, _ in BAD_INPUT:
        apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice(name, **spec))
    for name, _, ctype, reason, hint in BAD_INPUT:
        obj = wait_for(lambda: (o := get_ns(apis, name)) and cond(o, ctype) and o, what=f"{ctype} on {name}")
        got = cond(obj, ctype)
        assert (got["status"], got["reason"]) == ("False", reason), got
        assert hint in got["message"]
        assert obj["status"]["phase"] == "Failed"
        assert cond(obj, "Ready")["status"] == "False"
        assert not any(children_exist(apis, name).values()), f"{name} left children behind"


L4_SPEC = {"model": {"name": "llama-3-8b"}, "gpu": {"products": ["NVIDIA-L4"]}, "cpuOffload": {"mode": "off"}}
# specs the CRD schema admits but the API server refuses for a child: (name, spec change, server's words)
SERVER_REFUSES = [
    ("3llama", {}, "DNS-1035"),  # a NeoService name the Service's naming rules reject
    ("bad-quantity", {"resources": {"gateway": {"requests": {"cpu": "lots"}}}}, "quantities must match"),
    ("bad-toleration", {"podTemplate": {"spec": {"tolerations": [{"key": "k", "operator": "Sometimes"}]}}},
     "Unsupported value"),
    ("bad-label", {"podTemplate": {"metadata": {"labels": {"team": "a b"}}}}, "labels"),
    ("bad-resource-name", {"gpu": {"products": ["NVIDIA-L4"], "resourceName": "nvidia gpu"}}, "nvidia gpu"),
]


def _ensure_node(apis: dict, name: str, product: str) -> None:
    if not exists(apis["core"].read_node, name):
        make_node(apis["core"], name, product, annotations={c.READ_GBPS_ANNOTATION: "40"})


def test_specs_the_api_server_refuses_become_conditions_without_children(apis: dict) -> None:
    """Each child goes through a server-side dry run before the first write: a refusal is SpecValid=False
    with the server's message, nothing is written, and the operator waits for the next spec change."""
    _ensure_node(apis, "gpu-l4-1", "NVIDIA-L4")
    for name, change, _ in SERVER_REFUSES:
        apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL,
                                                       neoservice(name, **{**L4_SPEC, **change}))
    for name, _, words in SERVER_REFUSES:
        try:
            obj = wait_for(lambda: (o := get_ns(apis, name)) and (cond(o, "SpecValid") or {}).get("status") == "False"
                           and o, what=f"SpecValid False on {name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\noperator log:\n{apis['operator'].tail()}") from None
        got = cond(obj, "SpecValid")
        assert got["reason"] == "RejectedByApiServer" and words in got["message"], got
        assert obj["status"]["phase"] == "Failed" and obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        assert not any(children_exist(apis, name).values()), f"{name} left children behind"
    # no retry loop: nothing more happens until the spec changes
    mentions = {name: apis["operator"].tail(5000).count(f"{NS}/{name}") for name, _, _ in SERVER_REFUSES}
    time.sleep(3)  # three retry periods of this operator (--retry-seconds 1)
    assert {name: apis["operator"].tail(5000).count(f"{NS}/{name}") for name, _, _ in SERVER_REFUSES} == mentions
    assert "Traceback" not in apis["operator"].tail(400)
    # fixed: served
    apis["custom"].patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "bad-label", {
        "spec": {"podTemplate": {"metadata": {"labels": {"team": "a-b"}}}}})
    wait_for(lambda: all(children_exist(apis, "bad-label").values()), what="bad-label served after the fix")
    assert cond(get_ns(apis, "bad-label"), "SpecValid")["status"] == "True"


def test_fixing_a_bad_spec_recovers(apis: dict) -> None:
    measured_a10g(apis)
    if not exists(apis["custom"].get_namespaced_custom_object, c.GROUP, c.VERSION, NS, c.PLURAL, "kv-too-big"):
        apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL,
                                                       neoservice("kv-too-big", **BAD_INPUT[1][1]))
    wait_for(lambda: (cond(get_ns(apis, "kv-too-big"), "Sized") or {}).get("reason") == "KvMemoryExceedsNode",
             what="kv-too-big refused first")
    apis["custom"].patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "kv-too-big",
                                                  {"spec": {"cpuOffload": {"kvMemory": "4Gi"}}})
    obj = wait_for(lambda: (o := get_ns(apis, "kv-too-big")) and cond(o, "Sized")["status"] == "True" and o,
                   what="kv-too-big sized after the fix")
    assert obj["status"]["sizing"]["cpuKvBlocks"] == 2048
    assert all(children_exist(apis, "kv-too-big").values())


def test_waits_for_the_probe_then_sizes(apis: dict) -> None:
    core = apis["core"]
    make_node(core, "gpu-h100-1", "NVIDIA-H100-80GB-HBM3", 81559, gpus=8, cpus="128", memory="1Ti")
    spec = {"model": {"name": "llama-3-8b"}, "gpu": {"products": ["NVIDIA-H100-80GB-HBM3"]},
            "cpuOffload": {"mode": "auto", "kvMemory": "64Gi"}}
    apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice("h100", **spec))
    obj = wait_for(lambda: (o := get_ns(apis, "h100")) and cond(o, "Sized") and o, what="Sized condition")
    assert cond(obj, "Sized")["reason"] == "BandwidthProbePending" and obj["status"]["phase"] == "Pending"
    assert "gpu-h100-1" in cond(obj, "Sized")["message"]
    assert not any(children_exist(apis, "h100").values())

    # the real probe, run on this machine in the kubelet's place
    measured = json.loads(fake_kubelet_complete_probe(apis, "gpu-h100-1"))
    obj = wait_for(lambda: (o := get_ns(apis, "h100")) and cond(o, "Sized")["status"] == "True" and o, timeout=45,
                   what="sized after the probe")
    decision = expected_decision(apis, obj["spec"])
    assert obj["status"]["sizing"]["hostReadGBps"] == round(measured["read_gbps"], 1) > 0
    assert obj["status"]["sizing"]["offload"] is decision.offload is False  # an H100 holds 8B's batch itself
    assert obj["status"]["offload"] == "off"
    assert current_configmap(apis, "h100").data["NEO_OFFLOAD_MODE"] == "off"


def test_name_taken_by_someone_else(apis: dict) -> None:
    core = apis["core"]
    measured_a10g(apis)
    core.create_namespaced_service(NS, {"metadata": {"name": "taken", "labels": {"mine": "yes"}},
                                        "spec": {"ports": [{"port": 80}]}})
    apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice("taken", **SPEC))
    obj = wait_for(lambda: (o := get_ns(apis, "taken")) and cond(o, "SpecValid") and o, what="SpecValid on taken")
    got = cond(obj, "SpecValid")
    assert (got["status"], got["reason"]) == ("False", "NameConflict") and "Service team-a/taken" in got["message"]
    assert core.read_namespaced_service("taken", NS).metadata.labels == {"mine": "yes"}
    assert not exists(apis["apps"].read_namespaced_deployment, "taken", NS)
    assert not configmaps(apis, "taken")


def test_rollback_restores_the_configuration(apis: dict) -> None:
    """Each configuration is an immutable ConfigMap named after its content: after a spec change, rolling
    the Deployment back (its template replaced by the previous revision's, as `kubectl rollout undo`
    does) brings back pods that read the previous configuration, which still exists unchanged; the
    operator does not undo the rollback, and keeps only the newest few configurations."""
    apps, custom = apis["apps"], apis["custom"]
    measured_a10g(apis)
    served(apis, "undo", SPEC)
    first = apps.read_namespaced_deployment("undo", NS)
    old_cm = template_configmap(first)
    old_data = apis["core"].read_namespaced_config_map(old_cm, NS).data
    assert apis["core"].read_namespaced_config_map(old_cm, NS).immutable is True
    custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "undo", {"spec": {"engine": {"maxNumSeqs": 32}}})
    second = wait_for(lambda: (d := apps.read_namespaced_deployment("undo", NS)) and template_configmap(d) != old_cm and d,
                      what="a new configuration in the template")
    assert current_configmap(apis, "undo").data["NEO_MAX_NUM_SEQS"] == "32"
    assert apis["core"].read_namespaced_config_map(old_cm, NS).data == old_data  # old pods keep theirs
    # kubectl rollout undo: the previous revision's template, as is
    template = apis["api"].sanitize_for_serialization(first.spec.template)
    apps.patch_namespaced_deployment("undo", NS, [{"op": "replace", "path": "/spec/template", "value": template}])
    time.sleep(2)  # give the operator every chance to fight the rollback or prune what it needs
    rolled = apps.read_namespaced_deployment("undo", NS)
    assert template_configmap(rolled) == old_cm
    assert apis["core"].read_namespaced_config_map(old_cm, NS).data == old_data
    assert old_data["NEO_MAX_NUM_SEQS"] == "256"
    # a spec change rolls forward again; the oldest configurations go, the newest KEPT_CONFIGMAPS stay
    for seqs in (40, 48, 56, 64):
        custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "undo", {"spec": {"engine": {"maxNumSeqs": seqs}}})
        wait_for(lambda: any(cm.data["NEO_MAX_NUM_SEQS"] == str(seqs) for cm in configmaps(apis, "undo").values()),
                 what=f"configuration with maxNumSeqs {seqs}")
    kept = wait_for(lambda: len(cms := configmaps(apis, "undo")) == KEPT_CONFIGMAPS and cms,
                    what="old configurations pruned")
    assert sorted(cm.data["NEO_MAX_NUM_SEQS"] for cm in kept.values()) == ["48", "56", "64"]
    assert current_configmap(apis, "undo").data["NEO_MAX_NUM_SEQS"] == "64"


def test_a_node_that_joins_later_gets_the_workload(apis: dict) -> None:
    """No node of the product yet: Failed (NoMatchingNodes). When one joins, the operator's Node watch
    reconciles the NeoService again and it is sized and deployed, with no operator restart."""
    spec = {"model": {"name": "llama-3-8b"}, "gpu": {"products": ["NVIDIA-L40S"]}, "cpuOffload": {"mode": "off"}}
    apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice("late", **spec))
    obj = wait_for(lambda: (o := get_ns(apis, "late")) and cond(o, "Sized") and o, what="Sized on late")
    assert cond(obj, "Sized")["reason"] == "NoMatchingNodes" and obj["status"]["phase"] == "Failed"
    time.sleep(2)  # nothing retries a Failed service by itself
    assert not any(children_exist(apis, "late").values())
    make_node(apis["core"], "gpu-l40s-1", "NVIDIA-L40S", 46068, cpus="48", memory="192Gi")
    try:
        obj = wait_for(lambda: (o := get_ns(apis, "late")) and cond(o, "Sized")["status"] == "True" and o, timeout=15,
                       what="late sized after a matching node joined")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{apis['operator'].tail()}") from None
    assert obj["status"]["sizing"]["nodes"] == ["gpu-l40s-1"] and obj["status"]["phase"] == "Deploying"
    assert all(children_exist(apis, "late").values())


def test_empty_products_ignores_unknown_gpu_nodes(apis: dict) -> None:
    """No spec.gpu.products: every known product among the nodes; a node with an unknown product is left
    out and counted in the Sized message instead of failing the service."""
    if not exists(apis["core"].read_node, "gpu-mystery-1"):
        make_node(apis["core"], "gpu-mystery-1", "NVIDIA-Mystery-1", 32768, annotations={c.READ_GBPS_ANNOTATION: "50"})
    _ensure_node(apis, "gpu-l4-1", "NVIDIA-L4")
    spec = {"model": {"name": "smollm2-135m"}, "cpuOffload": {"mode": "off"}}
    apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice("anygpu", **spec))
    obj = wait_for(lambda: (o := get_ns(apis, "anygpu")) and cond(o, "Sized") and o, what="Sized on anygpu")
    sized = cond(obj, "Sized")
    assert sized["status"] == "True", sized
    assert "gpu-mystery-1" in sized["message"] and "ignored 1 node(s)" in sized["message"]
    assert "gpu-mystery-1" not in obj["status"]["sizing"]["nodes"] and "gpu-l4-1" in obj["status"]["sizing"]["nodes"]
    wait_for(lambda: all(children_exist(apis, "anygpu").values()), what="anygpu children")


def test_a_pending_probe_does_not_block_scaling(apis: dict) -> None:
    """A sized service (mode auto, its node measured) gets a new node of its product whose probe has not
    run: `kubectl scale` still scales it, the pending node is reported, and the result, once recorded,
    sizes it again with both nodes."""
    product = "NVIDIA-A100-SXM4-40GB"
    make_node(apis["core"], "gpu-a100-1", product, 40960, cpus="64", memory="256Gi",
              annotations={c.READ_GBPS_ANNOTATION: "80"})
    spec = {"model": {"name": "llama-3-8b"}, "gpu": {"products": [product]},
            "cpuOffload": {"mode": "auto", "kvMemory": "8Gi"}}
    served(apis, "grow", spec)
    make_node(apis["core"], "gpu-a100-2", product, 40960, cpus="64", memory="256Gi")  # no bandwidth yet
    wait_for(lambda: apis["batch"].read_namespaced_job(probe_job_name("gpu-a100-2"), OPERATOR_NAMESPACE),
             what="probe job of the new node")
    apis["custom"].patch_namespaced_custom_object_scale(c.GROUP, c.VERSION, NS, c.PLURAL, "grow", {"spec": {"replicas": 2}})
    try:
        wait_for(lambda: apis["apps"].read_namespaced_deployment("grow", NS).spec.replicas == 2, timeout=15,
                 what="Deployment scaled to 2 while the new node's probe is pending")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstatus: {get_ns(apis, 'grow').get('status')}") from None
    # the scale and the status that reports the pending node may come from two reconciles
    obj = wait_for(lambda: (o := get_ns(apis, "grow")) and cond(o, "Sized")["status"] == "True"
                   and "gpu-a100-2" in cond(o, "Sized")["message"] and o, timeout=15,
                   what="the pending node reported in Sized")
    assert obj["status"]["sizing"]["probesPending"] == ["gpu-a100-2"]
    fake_kubelet_complete_probe(apis, "gpu-a100-2", 70.0, 64)
    obj = wait_for(lambda: (o := get_ns(apis, "grow"))["status"]["sizing"]["probesPending"] == [] and o, timeout=20,
                   what="sized again once the probe result is recorded")
    assert obj["status"]["sizing"]["hostReadGBps"] == 70.0  # the slower node is now the basis


def fake_kubelet_fail_probe(apis: dict, node: str, said: str) -> str:
    """The kubelet's part for a probe that fails: its pod ends Failed with the probe's error as the
    termination message (FallbackToLogsOnError); returns the pod's Job's uid."""
    core, job = apis["core"], probe_job_name(node)
    pod = wait_for(lambda: next(iter(core.list_namespaced_pod(OPERATOR_NAMESPACE, label_selector=f"job-name={job}").items),
                                None), what=f"probe pod of {job}")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    core.patch_namespaced_pod_status(pod.metadata.name, OPERATOR_NAMESPACE, {"status": {
        "phase": "Failed",
        "containerStatuses": [{
            "name": "probe", "image": pod.spec.containers[0].image, "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": said, "startedAt": now,
                                     "finishedAt": now}}}]}})
    return pod.metadata.owner_references[0].uid


def test_a_failed_probe_surfaces_and_is_retried(apis: dict) -> None:
    """The probe pod fails: the NeoService says so with the Job's reason and the probe's words, and the
    operator replaces the Job with backoff (attempt 2), which then succeeds and the service is sized."""
    batch, product = apis["batch"], "Tesla-T4"
    make_node(apis["core"], "gpu-t4-1", product, 15360, cpus="16", memory="64Gi")
    spec = {"model": {"name": "smollm2-135m"}, "gpu": {"products": [product]},
            "cpuOffload": {"mode": "auto", "kvMemory": "1Gi"}}
    apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice("t4", **spec))
    job = wait_for(lambda: batch.read_namespaced_job(probe_job_name("gpu-t4-1"), OPERATOR_NAMESPACE), what="probe job")
    assert [s.name for s in job.spec.template.spec.image_pull_secrets] == [PULL_SECRET]
    first = fake_kubelet_fail_probe(apis, "gpu-t4-1", "ConfigError: no AVX2 on this CPU")
    try:
        obj = wait_for(lambda: (o := get_ns(apis, "t4")) and (cond(o, "Sized") or {}).get("reason")
                       == "BandwidthProbeFailed" and o, what="BandwidthProbeFailed on t4")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{apis['operator'].tail()}") from None
    message = cond(obj, "Sized")["message"]
    assert "gpu-t4-1" in message and "BackoffLimitExceeded" in message and "no AVX2 on this CPU" in message, message
    assert obj["status"]["phase"] == "Pending"
    replaced = wait_for(lambda: (j := batch.read_namespaced_job(probe_job_name("gpu-t4-1"), OPERATOR_NAMESPACE))
                        .metadata.uid != first and j, what="the failed probe Job replaced")
    assert replaced.metadata.annotations[c.PROBE_ATTEMPT_ANNOTATION] == "2"
    fake_kubelet_complete_probe(apis, "gpu-t4-1", 30.0, 16)
    try:   # the pending service is sized at its next retry after the probe result lands (within ~a minute)
        wait_for(lambda: (cond(get_ns(apis, "t4"), "Sized") or {}).get("status") == "True", timeout=90.0,
                 what="t4 sized after the retry")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{apis['operator'].tail()}") from None


def events_of(apis: dict, name: str) -> list[Any]:
    return apis["core"].list_namespaced_event(
        NS, field_selector=f"involvedObject.kind={c.KIND},involvedObject.name={name}").items


def test_condition_changes_are_events(apis: dict) -> None:
    """Every condition change posts a core/v1 Event on the NeoService (Warning when it turned False,
    Normal when True), so `kubectl describe neo` tells the story; an unchanged condition posts none."""
    measured_a10g(apis)
    spec = {"model": {"name": "llama-3-8b"}, "gpu": {"products": [A10G]}, "cpuOffload": {"mode": "full", "kvMemory": "10Ti"}}
    apis["custom"].create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice("told", **spec))
    try:
        warn = wait_for(lambda: [e for e in events_of(apis, "told") if e.reason == "KvMemoryExceedsNode"
                                 and e.message.startswith("Sized is False:")], what="a KvMemoryExceedsNode event on Sized")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{apis['operator'].tail()}") from None
    (event,) = warn
    uid = get_ns(apis, "told")["metadata"]["uid"]
    assert event.type == "Warning" and "kvMemory" in event.message
    # Ready follows the first failing condition, and says so in its own event
    assert any(e.message.startswith("Ready is False: Sized:") and e.type == "Warning" for e in events_of(apis, "told"))
    assert (event.involved_object.uid, event.involved_object.kind) == (uid, c.KIND)
    assert event.source.component == "neo-operator"
    assert any(e.reason == "Valid" and e.type == "Normal" for e in events_of(apis, "told"))  # SpecValid True
    apis["custom"].patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "told",
                                                  {"spec": {"cpuOffload": {"kvMemory": "4Gi"}}})
    sized = wait_for(lambda: [e for e in events_of(apis, "told") if e.reason == "Sized"], what="a Sized event")
    assert sized[0].type == "Normal" and sized[0].message.startswith("Sized is True:")
    wait_for(lambda: [e for e in events_of(apis, "told") if e.reason == "DeploymentMissing" or e.reason == "RollingUpdate"
                      or e.reason == "Progressing" or e.reason == "ReplicasNotReady"], what="a WorkloadReady event")
    # the status follower and the spec handler both write; only changes are events
    count = len(events_of(apis, "told"))
    apis["custom"].patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "told",
                                                  {"spec": {"engine": {"logLevel": "debug"}}})
    wait_for(lambda: get_ns(apis, "told")["status"].get("observedGeneration") == get_ns(apis, "told")["metadata"]["generation"],
             what="the log-level change observed")
    time.sleep(1)
    assert [e.reason for e in events_of(apis, "told")][count:] in ([], ["RollingUpdate"], ["Progressing"],
                                                                     ["Progressing", "RollingUpdate"])


def test_env_engine_args_and_disruption_budget(apis: dict) -> None:
    """spec.env/envFrom reach the engine containers, spec.engineArgs the engine's ConfigMap (checked by the
    engine's own parser: an unknown flag or one the operator sets is SpecValid=False naming it, nothing
    written), and a PodDisruptionBudget is owned, follows the spec and goes when switched off."""
    measured_a10g(apis)
    custom = apis["custom"]
    bad = {**SPEC, "engineArgs": ["--enable-prefix-caching", "false", "--no-such-flag"]}
    custom.create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, neoservice("knobs", **bad))
    try:
        obj = wait_for(lambda: (o := get_ns(apis, "knobs")) and (cond(o, "SpecValid") or {}).get("status") == "False"
                       and o, what="SpecValid False for an unknown engine flag")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{apis['operator'].tail()}") from None
    assert "spec.engineArgs" in cond(obj, "SpecValid")["message"] and "--no-such-flag" in cond(obj, "SpecValid")["message"]
    assert not any(children_exist(apis, "knobs").values())
    custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "knobs",
                                          {"spec": {"engineArgs": ["--max-num-seqs", "8"]}})
    wait_for(lambda: "--max-num-seqs (from spec.engine.maxNumSeqs)" in (cond(get_ns(apis, "knobs"), "SpecValid") or {})
             .get("message", ""), what="an operator-set flag refused, naming it")
    env = [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel:4317"}]
    env_from = [{"secretRef": {"name": "tracing", "optional": True}}]
    custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "knobs", {"spec": {
        "engineArgs": ["--enable-prefix-caching", "false"], "env": env, "envFrom": env_from,
        "disruptionBudget": {"maxUnavailable": "50%"}}})
    wait_for(lambda: all(children_exist(apis, "knobs").values()), what="knobs served")
    assert current_configmap(apis, "knobs").data["NEO_ENABLE_PREFIX_CACHING"] == "false"
    dep = apis["api"].sanitize_for_serialization(apis["apps"].read_namespaced_deployment("knobs", NS))
    for ct in dep["spec"]["template"]["spec"]["containers"]:
        assert ct["env"][-1] == env[0] and ct["envFrom"][0] == env_from[0]
        assert "configMapRef" in ct["envFrom"][-1]
    pdb = read_pdb(apis, "knobs")
    uid = get_ns(apis, "knobs")["metadata"]["uid"]
    assert pdb["spec"]["maxUnavailable"] == "50%" and pdb["metadata"]["ownerReferences"][0]["uid"] == uid
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, "knobs",
                                          {"spec": {"disruptionBudget": {"enabled": False}}})
    wait_for(lambda: not exists(read_pdb, apis, "knobs"), what="the budget removed when switched off")
