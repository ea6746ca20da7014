"""charts/neo with the real helm binary: lint, template, and the rendered objects validated offline
against the Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "neo"
CACHE = Path(os.environ.get("NEO_K8S_CACHE", Path.home() / ".cache" / "neo-k8s")) / os.environ.get("NEO_K8S_VERSION", "1.20.2")
# the oldest schema set kubernetes-validate ships, and its newest
K8S_SCHEMA_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    binary = CACHE / "helm"
    if not binary.exists():
        pytest.fail(f"{binary} missing: run `make k8s-tools` (scripts/k8s-tools.sh) first")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=check)


def render(*sets: str, namespace: str = "neo-system") -> list[dict[str, Any]]:
    args = ["template", "neo", str(CHART), "--namespace", namespace, "--include-crds"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def crd() -> dict[str, Any]:
    return yaml.safe_load((CHART / "crds" / "neoservices.neo.serving.io.yaml").read_text())


def validate(doc: dict[str, Any]) -> None:
    if doc["kind"] == "NeoService":
        schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        jsonschema.validate(doc, schema)
        return
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        return  # a CRD kind kubernetes-validate has no schema for; its shape is checked in its own test
    for version in K8S_SCHEMA_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


VALUE_SETS = {
    "defaults": (),
    "everything": ("example.enabled=true", "serviceMonitor.enabled=true", "operator.verbose=true",
                   "imagePullSecrets[0].name=regcred", "operator.nodeSelector.role=infra",
                   "operator.nodeReserve.cpu=2"),
    "namespaced": ("operator.watchNamespaces={team-a,team-b}", "serviceMonitor.enabled=true"),
    "cluster-wide": ("operator.clusterWide=true", "serviceMonitor.enabled=true", "networkPolicy.metricsFrom=null"),
}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint(name: str) -> None:
    args = ["lint", str(CHART), "--strict"]
    for s in VALUE_SETS[name]:
        args += ["--set", s]
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_objects_validate(name: str) -> None:
    docs = render(*VALUE_SETS[name])
    kinds = [d["kind"] for d in docs]
    assert "CustomResourceDefinition" in kinds and "Deployment" in kinds and "ServiceAccount" in kinds
    for doc in docs:
        validate(doc)


def test_operator_deployment_has_liveness_and_runs_as_its_service_account() -> None:
    docs = render()
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == "neo-operator"
    (ct,) = pod["containers"]
    assert ct["command"] == ["neo", "operator"]
    env = {e["name"]: e.get("value") for e in ct["env"]}
    assert env["NEO_LIVENESS"] == "http://0.0.0.0:8080/healthz"
    assert ct["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in ct["ports"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert env["NEO_CPU_ATTENTION_IMAGE"] == "neo-cpu-attention:0.1.0"


def _rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for d in docs if d["kind"] == kind for r in d["rules"]]


READ = {"get", "list", "watch"}
CHILDREN = {"configmaps", "services", "deployments", "networkpolicies"}


def test_rbac_is_namespaced_and_least_privilege_by_default() -> None:
    docs = render()
    cluster_rules = _rules(docs, "ClusterRole")
    ns_rules = _rules(docs, "Role")
    for rule in cluster_rules + ns_rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    # cluster-wide: reads only (nodes, CRDs, namespaces); no workload, no Node write, no secret
    for rule in cluster_rules:
        assert set(rule["verbs"]) <= READ, rule
        assert not CHILDREN & set(rule["resources"]) and "neoservices" not in rule["resources"], rule
    assert {res for r in cluster_rules for res in r["resources"]} == {"nodes", "customresourcedefinitions", "namespaces"}
    assert not [d for d in docs if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"].endswith("-workloads")]
    # the workload rights and the probes' rights are Roles in the release namespace
    roles = [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    assert roles and all(d["metadata"]["namespace"] == "neo-system" for d in roles)
    ns_resources = {res for r in ns_rules for res in r["resources"]}
    assert CHILDREN | {"neoservices", "pods", "jobs"} <= ns_resources and "secrets" not in ns_resources
    for rule in ns_rules:
        if {"services", "deployments"} & set(rule["resources"]):
            assert "delete" not in rule["verbs"], "children are removed by garbage collection, not the operator"
    # the one workload delete besides a switched-off NetworkPolicy: configurations too old to roll back to
    assert any("configmaps" in r["resources"] and "delete" in r["verbs"] and "resourceNames" not in r for r in ns_rules)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NEO_NAMESPACE"] == "neo-system"  # the operator watches only what its Roles cover


def test_watch_namespaces_get_a_role_each() -> None:
    docs = render("operator.watchNamespaces={team-a,team-b}")
    for kind in ("Role", "RoleBinding"):
        workloads = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith("-workloads")]
        assert sorted(d["metadata"]["namespace"] for d in workloads) == ["team-a", "team-b"]
    assert not [d for d in docs if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"].endswith("-workloads")]
    # kopf lists namespaces to match its namespace patterns; only the namespaced modes need that
    assert {"namespaces"} <= {res for r in _rules(docs, "ClusterRole") for res in r["resources"]}
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NEO_NAMESPACE"] == "team-a,team-b"


def test_cluster_wide_only_when_asked() -> None:
    docs = render("operator.clusterWide=true")
    (workloads,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-workloads")]
    assert CHILDREN <= {res for r in workloads["rules"] for res in r["resources"]}
    assert [d["roleRef"]["name"] for d in docs if d["kind"] == "ClusterRoleBinding"] == [
        "neo-operator-cluster", "neo-operator-workloads"]
    assert "namespaces" not in {res for r in _rules(docs, "ClusterRole") for res in r["resources"]}
    nodes = [r for r in _rules(docs, "ClusterRole") if "nodes" in r["resources"]]
    assert nodes and all(set(r["verbs"]) <= READ for r in nodes)  # even cluster-wide, Nodes are read-only
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NEO_NAMESPACE"] == ""
    both = helm("template", "neo", str(CHART), "--set", "operator.clusterWide=true",
                "--set", "operator.watchNamespaces={a}", check=False)
    assert both.returncode != 0 and "exclude each other" in both.stderr


def test_metrics_peers_reach_the_operator() -> None:
    from neo_operator.opconfig import OperatorConfig

    def env_of(*sets: str) -> dict[str, str]:
        (dep,) = [d for d in render(*sets) if d["kind"] == "Deployment"]
        return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}

    cfg = OperatorConfig.from_args([], env=env_of())
    assert cfg.default_metrics_peers == ({"namespaceSelector": {},
                                          "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},)
    custom = env_of("networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring")
    assert OperatorConfig.from_args([], env=custom).default_metrics_peers == (
        {"namespaceSelector": {"matchLabels": {"team": "monitoring"}}},)
    assert OperatorConfig.from_args([], env=env_of("networkPolicy.metricsFrom=null")).default_metrics_peers == ()


def test_node_reserve_values_reach_the_operator() -> None:
    """operator.nodeReserve becomes the operator's --node-cpu-reserve, --node-memory-reserve-gib and
    --node-reserve-fraction (their NEO_* variables), parsed by the operator's own config."""
    from neo_operator.opconfig import OperatorConfig
    from neo_operator.sizing import NodeReserve

    def reserve(*args: str) -> NodeReserve:
        out = helm("template", "neo", str(CHART), *args).stdout
        (dep,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        return OperatorConfig.from_args([], env=env).node_reserve

    assert reserve() == OperatorConfig.from_args([], env={}).node_reserve  # the chart's defaults are the flags'
    assert reserve() == NodeReserve(cpu_min=1.0, memory_min=int(1.5 * (1 << 30)), fraction=0.05)
    assert reserve("--set", "operator.nodeReserve.cpu=3", "--set-json", "operator.nodeReserve.memoryGiB=2.5",
                   "--set-json", "operator.nodeReserve.fraction=0.1") == NodeReserve(
        cpu_min=3.0, memory_min=int(2.5 * (1 << 30)), fraction=0.1)


def test_example_neoservice_and_servicemonitor() -> None:
    docs = render("example.enabled=true", "serviceMonitor.enabled=true")
    (ns,) = [d for d in docs if d["kind"] == "NeoService"]
    assert ns["spec"]["model"] == {"source": "dummy", "name": "llama-3-8b"}
    (sm,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "neo-operator"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["neo-system"]}
    (wide,) = [d for d in render("serviceMonitor.enabled=true", "operator.clusterWide=true")
               if d["kind"] == "ServiceMonitor"]
    assert wide["spec"]["namespaceSelector"] == {"any": True}
    assert not [d for d in render() if d["kind"] in ("NeoService", "ServiceMonitor")]


@pytest.mark.parametrize("bad", [
    "operator.retrySeconds=-1",
    "image.pullPolicy=Sometimes",
    "example.cpuOffload.mode=maybe",
    "serviceMonitor.interval=soon",
    "unknownKey=1",
    "operator.clusterWide=maybe",
    "networkPolicy.metricsFrom[0].pods.app=x",
    "operator.nodeReserve.cpu=-1",
    "operator.nodeReserve.fraction=1",
    "operator.nodeReserve.cores=2",
])
def test_values_schema_rejects_bad_values(bad: str) -> None:
    result = helm("template", "neo", str(CHART), "--set", bad, check=False)
    assert result.returncode != 0
    assert "schema" in (result.stderr + result.stdout).lower()


def test_invalid_neoservice_fails_the_crd_schema() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    good = {"apiVersion": "neo.serving.io/v1alpha1", "kind": "NeoService", "metadata": {"name": "x"},
            "spec": {"model": {"name": "llama-3-8b"}, "cpuOffload": {"mode": "auto", "kvMemory": "16Gi"}}}
    jsonschema.validate(good, schema)
    for spec in ({"model": {"name": "a"}, "cpuOffload": {"mode": "sometimes"}},
                 {"model": {"name": "a"}, "cpuOffload": {"kvMemory": "lots"}},
                 {"model": {"name": "a"}, "replicas": -1},
                 {"model": {"name": "a"}, "engine": {"blockSize": 12}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**good, "spec": spec}, schema)
