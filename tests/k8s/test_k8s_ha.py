"""Two operator replicas under kopf peering (the chart with operator.replicas=2): one is active, the
other stands by, and when the active one leaves the standby takes over at once; no 60 s stalls."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import pytest
import yaml
from kubernetes import client, utils

from neo_operator import constants as c

from kube_cluster import (CHART, OPERATOR_NAMESPACE, OPERATOR_SA, Cluster, Operator, create_namespace, helm_template,
                          install_crd, install_rbac, wait_for)

pytestmark = pytest.mark.k8s

NS = "team-ha"
PEERING = "neo"  # the chart's ClusterKopfPeering is named after the release
SPEC = {"model": {"name": "smollm2-135m"}, "cpuOffload": {"mode": "off"}, "gpu": {"products": ["NVIDIA-L4"]}}


@pytest.fixture(scope="module")
def pair(cluster: Cluster) -> Iterator[tuple[Operator, Operator]]:
    install_crd(cluster)
    ext = client.ApiextensionsV1Api(cluster.api)
    with contextlib.suppress(client.ApiException):
        ext.create_custom_resource_definition(yaml.safe_load((CHART / "crds" / "clusterkopfpeerings.kopf.dev.yaml").read_text()))
    wait_for(lambda: any(x.type == "Established" and x.status == "True" for x in
                         ext.read_custom_resource_definition("clusterkopfpeerings.kopf.dev").status.conditions or []),
             what="peering CRD Established")
    sets = ("operator.clusterWide=true", "operator.replicas=2")
    assert OPERATOR_SA in install_rbac(cluster, "neo", OPERATOR_NAMESPACE, *sets)
    for doc in helm_template("--namespace", OPERATOR_NAMESPACE, *[a for s in sets for a in ("--set", s)]):
        if doc["kind"] == "ClusterKopfPeering":  # the peering object
            with contextlib.suppress(client.ApiException):
                client.CustomObjectsApi(cluster.api).create_cluster_custom_object("kopf.dev", "v1",
                                                                                  "clusterkopfpeerings", doc)
        if doc["kind"] == "ClusterRole":  # the rights on it
            with contextlib.suppress(utils.FailToCreateError):
                utils.create_from_dict(cluster.api, doc)
            if doc["kind"] == "ClusterRole":  # an earlier module may have created it without the peering rule
                client.RbacAuthorizationV1Api(cluster.api).replace_cluster_role(doc["metadata"]["name"], doc)
    create_namespace(cluster, NS)
    core = client.CoreV1Api(cluster.api)
    if not any(n.metadata.name == "gpu-l4-ha" for n in core.list_node().items):
        core.create_node({"metadata": {"name": "gpu-l4-ha", "labels": {c.GPU_PRODUCT_LABEL: "NVIDIA-L4"}}})
        res = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "1"}
        core.patch_node_status("gpu-l4-ha", {"status": {"capacity": res, "allocatable": res}})
    ops = [Operator(cluster, cluster.operator_kubeconfig, OPERATOR_NAMESPACE,
                    ("--peering", PEERING, "--priority", str(prio)), name=f"ha-{prio}") for prio in (200, 100)]
    try:
        for op in ops:
            op.start()
        yield ops[0], ops[1]
    finally:
        for op in ops:
            op.stop()


def _create(cluster: Cluster, name: str) -> None:
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(c.GROUP, c.VERSION, NS, c.PLURAL, {
        "apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name, "namespace": NS}, "spec": SPEC})


def _deployment(cluster: Cluster, name: str):
    return client.AppsV1Api(cluster.api).read_namespaced_deployment(name, NS)


def test_one_replica_serves_and_the_standby_takes_over(cluster: Cluster, pair: tuple[Operator, Operator]) -> None:
    active, standby = pair
    started = time.monotonic()
    _create(cluster, "ha1")
    try:
        wait_for(lambda: _deployment(cluster, "ha1"), timeout=20, what="ha1 served by the active replica")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nactive:\n{active.tail()}\nstandby:\n{standby.tail()}") from None
    assert time.monotonic() - started < 15  # no stall
    time.sleep(1)
    assert f"created Deployment {NS}/ha1" in active.tail(400)
    assert f"{NS}/ha1" not in standby.tail(400)  # paused: it never handled the object

    active.stop()  # a clean leave removes its peering record: the standby resumes at once
    started = time.monotonic()
    _create(cluster, "ha2")
    try:
        wait_for(lambda: _deployment(cluster, "ha2"), timeout=20, what="ha2 served by the standby after the takeover")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstandby:\n{standby.tail()}") from None
    assert time.monotonic() - started < 15
    assert f"created Deployment {NS}/ha2" in standby.tail(400)
    # and both NeoServices end with the same children as one operator would have written
    for name in ("ha1", "ha2"):
        dep = _deployment(cluster, name)
        assert dep.metadata.owner_references[0].kind == c.KIND
