"""The Deployment: one replica = one pod with the gateway, gpu-worker and cpu-attention containers.

The three containers share a memory-backed emptyDir at /dev/shm that holds the CPU KV pool and the
per-layer staging area (sized by the sizing decision), and a small private one (``runtime``) in
which the gateway binds the ipc:// sockets the workers connect to: only this pod's containers,
all running as RUN_AS_USER, can reach the link. Every container's root filesystem is read-only;
/tmp and a cache directory (cost tables, Triton and inductor kernels, $HOME) are emptyDirs. The
pods get no ServiceAccount token: nothing in them talks to the API server.
"""

from __future__ import annotations

import copy
from typing import Any

from neo_common.procs import MULTICAST_OFF
from neo_operator import constants as c
from neo_operator.configmap import KEPT_CONFIGMAPS, configmap_name
from neo_operator.labels import child_labels, selector_labels
from neo_operator.model_source import download_init_container, model_volume
from neo_operator.lifecycle import gateway_pre_stop, termination_grace_seconds, worker_pre_stop
from neo_operator.sizing import SizingDecision
from neo_operator.spec import NeoServiceSpec

# A fixed non-root identity: works whatever USER the image declares (runAsNonRoot needs a number).
RUN_AS_USER = 10001
RUNTIME_SIZE = "16Mi"  # sockets and two key files
TMP_SIZE = "1Gi"
CACHE_SIZE = "4Gi"  # Triton/inductor kernels and the cost tables; weights come from the model volume
CACHE_ENV = c.CACHE_ENV
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}


def _resources(computed: dict[str, str], override: dict[str, Any], limits: dict[str, str] | None = None) -> dict[str, Any]:
    """Requests, with limits equal to them (Guaranteed QoS: the static CPU manager pins a Guaranteed
    pod's integer-CPU containers to whole cores), the user's ``spec.resources`` over both."""
    requests = {**computed, **{k: str(v) for k, v in (override.get("requests") or {}).items()}}
    return {"requests": requests,
            "limits": {**requests, **(limits or {}), **{k: str(v) for k, v in (override.get("limits") or {}).items()}}}


def _http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 3}


def _container(name: str, image: str, command: str, spec: NeoServiceSpec, configmap: str,
               resources: dict[str, Any], model: bool) -> dict[str, Any]:
    mounts = [{"name": "shm", "mountPath": c.SHM_PATH}, {"name": "runtime", "mountPath": c.RUNTIME_MOUNT},
              {"name": "tmp", "mountPath": c.TMP_MOUNT}, {"name": "cache", "mountPath": c.CACHE_MOUNT}]
    if model and spec.model.source != "dummy":  # on the claim, or downloaded by the init container
        mounts.append({"name": "model", "mountPath": c.MODEL_MOUNT, "readOnly": True})
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": spec.images.pull_policy,
        "command": ["neo", command],
        # the user's sources first: for a key in several, the last source wins, so the engine's NEO_*
        # variables always come from the operator's ConfigMap
        "envFrom": [*copy.deepcopy(list(spec.env_from)), {"configMapRef": {"name": configmap}}],
        "env": [{"name": k, "value": v} for k, v in {**MULTICAST_OFF, **CACHE_ENV}.items()]
        + copy.deepcopy(list(spec.env)),
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _model_check(spec: NeoServiceSpec) -> dict[str, Any]:
    """An init container that fails fast, with a message saying what to fix, when the model file is not
    on the volume (the operator can see that the claim exists, not what is on it)."""
    path = f"{c.MODEL_MOUNT}/{spec.model.path}"
    kind = "file" if spec.model.source == "gguf" else "folder"
    test = "-f" if spec.model.source == "gguf" else "-d"
    message = (f"model {kind} {spec.model.path} not found on PersistentVolumeClaim {spec.model.claim_name}; "
               "fix spec.model.volume.path or copy the model there")
    return {
        "name": "model-check",
        "image": spec.images.gateway,
        "imagePullPolicy": spec.images.pull_policy,
        "command": ["/bin/sh", "-c", f'test {test} "$0" || {{ echo "$1" > /dev/termination-log; exit 1; }}',
                    path, message],
        "volumeMounts": [{"name": "model", "mountPath": c.MODEL_MOUNT, "readOnly": True}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "10m", "memory": "16Mi"}},
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _init_container(spec: NeoServiceSpec) -> dict[str, Any]:
    """Before the engine starts: download an hf:// model, or check that the volume holds the model."""
    if spec.model.hub is not None:
        return download_init_container(spec.model.hub, spec.images.gateway, spec.images.pull_policy)
    return _model_check(spec)


def _affinity(products: tuple[str, ...], override: dict[str, Any] | None) -> dict[str, Any]:
    """Pin pods to the GPU products the sizing was done for, AND-ed into any user node affinity."""
    ours = {"key": c.GPU_PRODUCT_LABEL, "operator": "In", "values": list(products)}
    affinity = copy.deepcopy(override) if override else {}
    node = affinity.setdefault("nodeAffinity", {})
    required = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    for term in terms:
        term.setdefault("matchExpressions", []).append(ours)
    required["nodeSelectorTerms"] = terms
    return affinity


def build_pod_template(name: str, spec: NeoServiceSpec, decision: SizingDecision, config_hash: str) -> dict[str, Any]:
    res = spec.resources
    req = decision.requests
    configmap = configmap_name(name, config_hash)  # the immutable ConfigMap of this configuration
    gateway = _container("gateway", spec.images.gateway, "gateway", spec, configmap,
                         _resources(req["gateway"], res.get("gateway", {})), model=True)
    gateway["ports"] = [{"name": "http", "containerPort": c.GATEWAY_PORT, "protocol": "TCP"}]
    gateway["readinessProbe"] = _http_probe("/ready", 5, 3)
    gateway["livenessProbe"] = _http_probe("/health", 10, 6)  # a worker down for a minute restarts the replica
    gateway["startupProbe"] = _http_probe("/health", 10, 90)  # weights may take minutes to load
    gateway["lifecycle"] = {"preStop": gateway_pre_stop()}
    if spec.api_key_secret is not None:  # from the Secret, never through the ConfigMap
        gateway["env"].append({"name": "NEO_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": spec.api_key_secret.name, "key": spec.api_key_secret.key}}})
    worker = _container("gpu-worker", spec.images.gpu_worker, "gpu-worker", spec, configmap,
                        _resources(req["gpuWorker"], res.get("gpuWorker", {}),
                                   limits={spec.gpu.resource_name: str(spec.gpu.count)}), model=True)
    workers = [worker]
    if decision.offload:   # without offloading nothing would connect it: the kubelet would restart it forever
        workers.append(_container("cpu-attention", spec.images.cpu_attention, "cpu-attention", spec, configmap,
                                  _resources(req["cpuAttention"], res.get("cpuAttention", {})), model=False))
    for ct in workers:
        ct["lifecycle"] = {"preStop": worker_pre_stop(c.GATEWAY_PORT, spec.shutdown_grace_seconds)}

    volumes: list[dict[str, Any]] = [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": decision.shm_quantity}},
        {"name": "runtime", "emptyDir": {"medium": "Memory", "sizeLimit": RUNTIME_SIZE}},
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
        {"name": "cache", "emptyDir": {"sizeLimit": CACHE_SIZE}},
    ]
    if spec.model.hub is not None:
        volumes.append(model_volume(spec.model.hub))
    elif spec.model.on_volume:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model.claim_name, "readOnly": True}})

    overrides = spec.pod_spec
    pod_spec: dict[str, Any] = {
        "containers": [gateway, *workers],
        **({"initContainers": [_init_container(spec)]} if spec.model.source != "dummy" else {}),
        "volumes": volumes,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                            "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}},
        "affinity": _affinity(decision.gpu_products, overrides.get("affinity")),
        "tolerations": [{"key": spec.gpu.resource_name, "operator": "Exists", "effect": "NoSchedule"},
                        *copy.deepcopy(overrides.get("tolerations") or [])],
        "terminationGracePeriodSeconds": termination_grace_seconds(spec.shutdown_grace_seconds),
    }
    node_selector = {**spec.gpu.node_selector, **(overrides.get("nodeSelector") or {})}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    for key in ("priorityClassName", "imagePullSecrets", "serviceAccountName", "runtimeClassName", "schedulerName"):
        if overrides.get(key):
            pod_spec[key] = copy.deepcopy(overrides[key])

    labels = {**spec.pod_metadata.get("labels", {}), **child_labels(name)}
    annotations = {**spec.pod_metadata.get("annotations", {}), c.CONFIG_HASH_ANNOTATION: config_hash}
    return {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec}


def build_deployment(name: str, spec: NeoServiceSpec, decision: SizingDecision, config_hash: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": child_labels(name)},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            # GPUs are scarce: replace pods one at a time instead of asking for a spare GPU to surge into.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            # a rollback reaches as far back as the ConfigMaps the operator keeps
            "revisionHistoryLimit": KEPT_CONFIGMAPS - 1,
            "progressDeadlineSeconds": 1800,
            "template": build_pod_template(name, spec, decision, config_hash),
        },
    }
