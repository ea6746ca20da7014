"""A release that watches chosen namespaces only: the chart's namespaced RBAC is enough for the
operator there, and grants nothing elsewhere."""

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
    assert not allowed(cluster, "create", "deployments", OTHER, "apps")
    assert not allowed(cluster, "get", "secrets", WATCHED)
    assert allowed(cluster, "create", "jobs", SCOPED_NAMESPACE, "batch")
    assert not allowed(cluster, "create", "jobs", WATCHED, "batch")


def test_serves_the_watched_namespace_only(cluster: Cluster, scoped: Operator) -> None:
    custom = client.CustomObjectsApi(cluster.api)
    spec = {"model": {"name": "smollm2-135m"}, "cpuOffload": {"mode": "off"}, "gpu": {"products": ["NVIDIA-L4"]}}
    core = client.CoreV1Api(cluster.api)
    if not any(n.metadata.name == "gpu-l4-b" for n in core.list_node().items):
        core.create_node({"metadata": {"name": "gpu-l4-b", "labels": {c.GPU_PRODUCT_LABEL: "NVIDIA-L4"},
                                       "annotations": {c.READ_GBPS_ANNOTATION: "40"}}})
        res = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "1"}
        core.patch_node_status("gpu-l4-b", {"status": {"capacity": res, "allocatable": res}})
    for ns in (WATCHED, OTHER):
        custom.create_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, {
            "apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "smol", "namespace": ns}, "spec": spec})
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
