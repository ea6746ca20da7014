"""charts/neo/dashboards/neo.json: valid JSON, every PromQL expression names only series the gateway
really exports (scraped from a real replica's /metrics), and the chart ships it as a
Grafana-sidecar ConfigMap that renders and validates with the real helm binary."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "neo"
DASHBOARD = CHART / "dashboards" / "neo.json"
CACHE = Path(os.environ.get("NEO_K8S_CACHE", Path.home() / ".cache" / "neo-k8s")) / os.environ.get("NEO_K8S_VERSION", "1.20.2")
METRIC = re.compile(r"\b(?:neo|vllm):[A-Za-z0-9_:]+")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
# The metrics the issue asks the dashboard to show (families, before the exposition's suffixes).
# vLLM's series under vLLM's names, NEO's own under neo:
REQUIRED = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
            "neo:gpu_kv_blocks_free", "neo:gpu_kv_blocks_total", "vllm:num_preemptions_total", "neo:worker_up",
            "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
            "vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
            "vllm:request_success_total", "neo:iteration_duration_seconds_bucket",
            "neo:worker_iteration_seconds_bucket", "neo:iteration_tokens_total",
            # the prefix cache (issue 18): vLLM's GPU-tier series, NEO's per-tier hits and host-tier traffic
            "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "neo:prefix_cache_hits_total",
            "neo:prefix_cache_demoted_bytes_total", "neo:prefix_cache_promoted_bytes_total",
            "neo:prefix_cache_host_blocks"}


@pytest.fixture(scope="module")
def exported_samples(small_pool_replica) -> dict[str, set[str]]:
    """Sample name -> label names, scraped from a real replica's /metrics after one finished request."""
    url = small_pool_replica.url
    done = httpx.post(url + "/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "Hi",
                                                     "max_tokens": 2}, timeout=120)
    assert done.status_code == 200, done.text
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out += [p] if p["type"] != "row" else p.get("panels", [])
    return [p for p in out if p["type"] != "row"]


@pytest.mark.integration
def test_every_expression_uses_exported_series_and_labels(exported_samples) -> None:
    samples = exported_samples
    dash = dashboard()
    used: set[str] = set()
    exprs = [t["expr"] for p in panels(dash) for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    assert exprs
    for expr in exprs:
        names = set(METRIC.findall(expr))
        assert names, expr
        unknown = names - set(samples)
        assert not unknown, f"{expr}: not exported by the gateway: {unknown}"
        labels = set().union(*(samples[n] for n in names))
        for group in BY.findall(expr):
            grouped = {g.strip() for g in group.split(",") if g.strip()}
            assert grouped <= labels, f"{expr}: groups by labels the series lack: {grouped - labels}"
        if "histogram_quantile" in expr:
            assert all(n.endswith("_bucket") for n in names) and "le" in BY.findall(expr)[0]
        used |= names
    assert REQUIRED <= used, f"metrics without a panel: {REQUIRED - used}"
    per_tier = [e for e in exprs if "neo:prefix_cache_hits_total" in e and "vllm:prefix_cache_queries_total" in e]
    assert any("tier" in {g.strip() for g in BY.findall(e)[0].split(",")} for e in per_tier), \
        "a hit rate per tier: hits by tier over the tokens looked up"


def test_panels_use_the_datasource_variable_and_filter_by_model() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels(dash):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert 'model_name=~"$model_name"' in t["expr"], t["expr"]
    quantiles = [t["expr"] for p in panels(dash) for t in p["targets"] if "histogram_quantile" in t["expr"]]
    for metric in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                   "iteration_duration_seconds", "worker_iteration_seconds"):
        qs = {e.split(",")[0] for e in quantiles if metric in e}
        assert qs == {"histogram_quantile(0.5", "histogram_quantile(0.99"}, metric


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    binary = CACHE / "helm"
    if not binary.exists():
        pytest.fail(f"{binary} missing: run `make k8s-tools` (scripts/k8s-tools.sh) first")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=check)


def render(*sets: str) -> list[dict[str, Any]]:
    args = ["template", "neo", str(CHART), "--namespace", "neo-system"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def test_chart_ships_the_dashboard_configmap_when_enabled() -> None:
    assert not [d for d in render() if d["kind"] == "ConfigMap"]
    sets = ("grafanaDashboard.enabled=true", "grafanaDashboard.annotations.grafana_folder=NEO")
    lint = helm("lint", str(CHART), "--strict", *[a for s in sets for a in ("--set", s)], check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(*sets)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    for version in ("1.25.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(cm, version, strict=True)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "neo-system"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "NEO"}
    assert json.loads(cm["data"]["neo.json"]) == dashboard()
    (other,) = [d for d in render("grafanaDashboard.enabled=true", "grafanaDashboard.label=dashboards",
                                  "grafanaDashboard.labelValue=neo", "grafanaDashboard.namespace=monitoring")
                if d["kind"] == "ConfigMap"]
    assert other["metadata"]["labels"]["dashboards"] == "neo" and other["metadata"]["namespace"] == "monitoring"


@pytest.mark.parametrize("bad", ["grafanaDashboard.enabled=maybe", "grafanaDashboard.label=no spaces",
                                 "grafanaDashboard.namespace=Not_A_Namespace", "grafanaDashboard.extra=1"])
def test_values_schema_rejects_bad_dashboard_values(bad: str) -> None:
    result = helm("template", "neo", str(CHART), "--set", bad, check=False)
    assert result.returncode != 0 and "schema" in (result.stderr + result.stdout).lower()
