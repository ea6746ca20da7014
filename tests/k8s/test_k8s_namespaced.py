"""A release that watches chosen namespaces only: the chart's namespaced RBAC (a Role and RoleBinding
per watched namespace, read-only cluster rights) is enough for the operator there, and grants nothing
elsewhere. The children it writes with those rights, the hardened pod and the NetworkPolicy, are what
the API server accepts and stores."""

from __future__ import annotations

import time
from typing import Iterator

import pytest
from kubernetes import client

from neo_operator import constants as c

from kube_cluster import (SCOPED_NAMESPACE, SCOPED_SA, Cluster, Operator, create_namespace, install_crd,
                          install_rbac, wait_for)

pytestmark = pytest.mark.k8s

WATCHED, OTHER = "team-b", "team-c"


@pytest.fixture(scope="module")
def scoped(cluster: Cluster) -> Iterator[Operator]:
    install_crd(cluster)
    for ns in (WATCHED, OTHER):
        create_namespace(cluster, ns)
    sa_names = install_rbac(cluster, "neo-scoped", SCOPED_NAMESPACE, f"operator.watchNamespaces={{{WATCHED}}}")
    assert SCOPED_SA in sa_names
    op = Operator(cluster, cluster.scoped_kubeconfig, SCOPED_NAMESPACE, ("--namespace", WATCHED), name="scoped")
    try:
        op.start()
        yield op
    finally:
        op.stop()


def allowed(cluster: Cluster, verb: str, resource: str, namespace: str, group: str = "") -> bool:
    review = client.AuthorizationV1Api(cluster.api).create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": f"system:serviceaccount:{SCOPED_NAMESPACE}:{SCOPED_SA}",
                 "groups": ["system:serviceaccounts", f"system:serviceaccounts:{SCOPED_NAMESPACE}"],
                 "resourceAttributes": {"verb": verb, "resource": resource, "namespace": namespace, "group": group}}})
    return bool(review.status.allowed)


def test_rights_only_in_watched_namespaces(cluster: Cluster, scoped: Operator) -> None:
    assert allowed(cluster, "create", "deployments", WATCHED, "apps")
    assert allowed(cluster, "create", "networkpolicies", WATCHED, "networking.k8s.io")
    for verb, resource, group in (("create", "deployments", "apps"), ("update", "configmaps", ""),
                                  ("update", "services", ""), ("create", "networkpolicies", "networking.k8s.io")):
        assert not allowed(cluster, verb, resource, OTHER, group)
        assert not allowed(cluster, verb, resource, "", group), f"{verb} {resource} cluster-wide"
    assert not allowed(cluster, "get", "secrets", WATCHED)
    assert allowed(cluster, "create", "jobs", SCOPED_NAMESPACE, "batch")
    # hf:// models: the model-inspection Jobs run in the NeoService's namespace, watched ones only
    assert allowed(cluster, "create", "jobs", WATCHED, "batch")
    assert not allowed(cluster, "create", "jobs", OTHER, "batch")
    # the engine pods are watched (PodsInitialized) in the watched namespaces only
    assert allowed(cluster, "watch", "pods", WATCHED) and not allowed(cluster, "watch", "pods", OTHER)
    assert not allowed(cluster, "watch", "pods", "")
    # Nodes: read, never write (the probe results go to a ConfigMap of the operator's namespace)
    assert allowed(cluster, "list", "nodes", "") and allowed(cluster, "watch", "nodes", "")
    for verb in ("patch", "update", "create", "delete"):
        assert not allowed(cluster, verb, "nodes", "")
    # in its own namespace it may update one ConfigMap only, the probe results
    assert not allowed(cluster, "update", "configmaps", SCOPED_NAMESPACE)
    review = client.AuthorizationV1Api(cluster.api).create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": f"system:serviceaccount:{SCOPED_NAMESPACE}:{SCOPED_SA}",
                 "groups": ["system:serviceaccounts"],
                 "resourceAttributes": {"verb": "update", "resource": "configmaps", "namespace": SCOPED_NAMESPACE,
                                        "name": c.PROBE_RESULTS_CONFIGMAP}}})
    assert review.status.allowed


SMOL = {"model": {"name": "smollm2-135m"}, "cpuOffload": {"mode": "off"}, "gpu": {"products": ["NVIDIA-L4"]}}


def ensure_l4_node(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api)
    if not any(n.metadata.name == "gpu-l4-b" for n in core.list_node().items):
        core.create_node({"metadata": {"name": "gpu-l4-b", "labels": {c.GPU_PRODUCT_LABEL: "NVIDIA-L4"},
                                       "annotations": {c.READ_GBPS_ANNOTATION: "40"}}})
        res = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "1"}
        core.patch_node_status("gpu-l4-b", {"status": {"capacity": res, "allocatable": res}})


def ensure_smol(cluster: Cluster) -> None:
    """The watched namespace's NeoService "smol", for a test run without the one that creates it."""
    ensure_l4_node(cluster)
    custom = client.CustomObjectsApi(cluster.api)
    try:
        custom.create_namespaced_custom_object(c.GROUP, c.VERSION, WATCHED, c.PLURAL, {
            "apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "smol", "namespace": WATCHED},
            "spec": SMOL})
    except client.ApiException as exc:
        assert exc.status == 409


def test_serves_the_watched_namespace_only(cluster: Cluster, scoped: Operator) -> None:
    custom = client.CustomObjectsApi(cluster.api)
    ensure_l4_node(cluster)
    for ns in (WATCHED, OTHER):
        custom.create_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, {
            "apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "smol", "namespace": ns}, "spec": SMOL})
    try:
        obj = wait_for(lambda: (o := custom.get_namespaced_custom_object(c.GROUP, c.VERSION, WATCHED, c.PLURAL, "smol"))
                       .get("status", {}).get("sizing") and o, what="NeoService in the watched namespace sized")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{scoped.tail()}") from None
    assert obj["status"]["sizing"]["offload"] is False
    apps = client.AppsV1Api(cluster.api)
    dep = apps.read_namespaced_deployment("smol", WATCHED)
    assert dep.metadata.owner_references[0].uid == obj["metadata"]["uid"]
    time.sleep(2)  # the other namespace's object is never touched
    other = custom.get_namespaced_custom_object(c.GROUP, c.VERSION, OTHER, c.PLURAL, "smol")
    assert "status" not in other
    assert apps.list_namespaced_deployment(OTHER).items == []
    assert "Forbidden" not in scoped.tail(400) and "403" not in scoped.tail(400)


def test_hardened_pod_and_network_policy_as_stored(cluster: Cluster, scoped: Operator) -> None:
    """What the API server kept of the operator's pod template and NetworkPolicy (read back, not built)."""
    apps, net = client.AppsV1Api(cluster.api), client.NetworkingV1Api(cluster.api)
    ensure_smol(cluster)
    dep = wait_for(lambda: apps.read_namespaced_deployment("smol", WATCHED), what="Deployment smol")
    pod = dep.spec.template.spec
    assert pod.automount_service_account_token is False
    assert pod.termination_grace_period_seconds > 30
    volumes = {v.name: v for v in pod.volumes}
    assert volumes["runtime"].empty_dir.medium == "Memory" and volumes["tmp"].empty_dir and volumes["cache"].empty_dir
    for ct in pod.containers:
        assert ct.security_context.read_only_root_filesystem is True, ct.name
        assert ct.lifecycle.pre_stop._exec.command[0] == "python3"
        mounts = {m.mount_path: m.name for m in ct.volume_mounts}
        assert mounts[c.RUNTIME_MOUNT] == "runtime" and mounts["/tmp"] == "tmp"
    cm = client.CoreV1Api(cluster.api).read_namespaced_config_map(pod.containers[0].env_from[0].config_map_ref.name,
                                                                  WATCHED)
    assert cm.data["NEO_RUNTIME_DIR"] == c.RUNTIME_DIR and "NEO_WORKER_ADDR" not in cm.data
    policy = net.read_namespaced_network_policy("smol", WATCHED)
    assert policy.metadata.owner_references[0].uid == dep.metadata.owner_references[0].uid
    assert policy.spec.policy_types == ["Ingress"]
    assert policy.spec.pod_selector.match_labels == dep.spec.selector.match_labels
    (rule,) = policy.spec.ingress  # the operator was started without --metrics-peers
    assert [(p.protocol, p.port) for p in rule.ports] == [("TCP", 8000)]
    assert [cluster.api.sanitize_for_serialization(p) for p in rule._from] == [{"podSelector": {}}]


def test_api_key_from_a_secret_and_the_policy_follows_the_spec(cluster: Cluster, scoped: Operator) -> None:
    custom, apps = client.CustomObjectsApi(cluster.api), client.AppsV1Api(cluster.api)
    net = client.NetworkingV1Api(cluster.api)
    ensure_l4_node(cluster)
    spec = {"model": {"name": "smollm2-135m"}, "cpuOffload": {"mode": "off"}, "gpu": {"products": ["NVIDIA-L4"]},
            "apiKeySecretRef": {"name": "neo-keys", "key": "api-keys"}, "shutdownGraceSeconds": 90,
            "networkPolicy": {"from": [{"namespaceSelector": {"matchLabels": {"team": "frontend"}}}],
                              "metricsFrom": [{"namespaceSelector": {}, "podSelector": {
                                  "matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]}}
    custom.create_namespaced_custom_object(c.GROUP, c.VERSION, WATCHED, c.PLURAL, {
        "apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "keyed", "namespace": WATCHED}, "spec": spec})
    dep = wait_for(lambda: apps.read_namespaced_deployment("keyed", WATCHED), what="Deployment keyed")
    gateway = dep.spec.template.spec.containers[0]
    (key,) = [e for e in gateway.env if e.name == "NEO_API_KEY"]
    assert (key.value_from.secret_key_ref.name, key.value_from.secret_key_ref.key) == ("neo-keys", "api-keys")
    assert all(e.name != "NEO_API_KEY" for ct in dep.spec.template.spec.containers[1:] for e in ct.env)
    cm = client.CoreV1Api(cluster.api).read_namespaced_config_map(gateway.env_from[0].config_map_ref.name, WATCHED)
    assert "NEO_API_KEY" not in cm.data and cm.data["NEO_SHUTDOWN_GRACE_S"] == "90.0"
    assert dep.spec.template.spec.termination_grace_period_seconds > 90
    policy = cluster.api.sanitize_for_serialization(net.read_namespaced_network_policy("keyed", WATCHED))
    assert [rule["from"] for rule in policy["spec"]["ingress"]] == [spec["networkPolicy"]["from"],
                                                                     spec["networkPolicy"]["metricsFrom"]]
    # switched off: the operator removes the policy it owns (and keeps serving)
    custom.patch_namespaced_custom_object(c.GROUP, c.VERSION, WATCHED, c.PLURAL, "keyed",
                                          {"spec": {"networkPolicy": {"enabled": False}}})

    def gone() -> bool:
        try:
            net.read_namespaced_network_policy("keyed", WATCHED)
            return False
        except client.ApiException as exc:
            return exc.status == 404

    try:
        wait_for(gone, what="NetworkPolicy removed after networkPolicy.enabled: false")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{scoped.tail()}") from None
    assert apps.read_namespaced_deployment("keyed", WATCHED).metadata.uid == dep.metadata.uid
    assert "Forbidden" not in scoped.tail(400)
