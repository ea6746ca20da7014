"""The chart's autoscaling and Inference Extension examples (charts/neo/examples/): valid against their
schemas, and pointing at what the operator and the gateway really expose."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from neo_operator import constants as c
from neo_operator.labels import selector_labels

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "charts" / "neo" / "examples"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRD = REPO / "charts" / "neo" / "crds" / "neoservices.neo.serving.io.yaml"
QUEUE_METRIC = "vllm:num_requests_waiting"


def _load(name: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]
    return doc


def _scale_target_is_the_neoservice(ref: dict) -> None:
    assert (ref["apiVersion"], ref["kind"]) == (c.API_VERSION, c.KIND)
    (version,) = yaml.safe_load(CRD.read_text())["spec"]["versions"]
    assert version["subresources"]["scale"]["labelSelectorPath"] == ".status.selector"  # what an HPA needs


def _gateway_exports(metric: str) -> bool:
    prefix, name = metric.split(":", 1)
    source = "vllm_metrics.py" if prefix == "vllm" else "metrics.py"
    return f'("{name}"' in (REPO / "services" / "gateway" / source).read_text()


def test_hpa_example_is_a_valid_hpa_on_the_queue_metric() -> None:
    hpa = _load("hpa-queue.yaml")
    kubernetes_validate.validate(hpa, "1.25.0", strict=True)
    _scale_target_is_the_neoservice(hpa["spec"]["scaleTargetRef"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "neo_num_requests_waiting"
    text = (EXAMPLES / "hpa-queue.yaml").read_text()
    assert f"seriesQuery: '{QUEUE_METRIC}" in text and _gateway_exports(QUEUE_METRIC)  # the adapter rule's source


def test_keda_example_matches_the_scaledobject_schema() -> None:
    so = _load("keda-scaledobject.yaml")
    assert (so["apiVersion"], so["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    jsonschema.validate(so["spec"], yaml.safe_load((SCHEMAS / "keda-scaledobject-spec.yaml").read_text()))
    _scale_target_is_the_neoservice(so["spec"]["scaleTargetRef"])
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and QUEUE_METRIC in trigger["metadata"]["query"]


def test_inferencepool_example_selects_the_operators_pods() -> None:
    pool = _load("inferencepool.yaml")
    assert (pool["apiVersion"], pool["kind"]) == ("inference.networking.k8s.io/v1", "InferencePool")
    jsonschema.validate(pool["spec"], yaml.safe_load((SCHEMAS / "inferencepool-v1-spec.yaml").read_text()))
    assert pool["spec"]["selector"]["matchLabels"] == selector_labels(pool["metadata"]["name"])
    assert pool["spec"]["targetPorts"] == [{"number": c.GATEWAY_PORT}]


def test_a_bad_example_would_fail() -> None:
    """The vendored schemas do refuse what they should (a typo'd field, a missing port)."""
    import pytest

    pool = _load("inferencepool.yaml")["spec"]
    schema = yaml.safe_load((SCHEMAS / "inferencepool-v1-spec.yaml").read_text())
    for bad in ({**pool, "targetPortNumber": 8000}, {k: v for k, v in pool.items() if k != "targetPorts"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    so = _load("keda-scaledobject.yaml")["spec"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**so, "maxReplicas": 4}, yaml.safe_load((SCHEMAS / "keda-scaledobject-spec.yaml").read_text()))
