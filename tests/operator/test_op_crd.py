"""The chart's CRD (the one copy the tests apply) agrees with what the operator reads and writes."""

from __future__ import annotations

from pathlib import Path

import yaml

from neo_operator import constants as c
from neo_operator.spec import DTYPES, MODEL_SOURCES, OFFLOAD_MODES, POD_OVERRIDE_FIELDS, parse_spec

from op_helpers import IMAGES

CRD = Path(__file__).resolve().parents[2] / "charts" / "neo" / "crds" / "neoservices.neo.serving.io.yaml"


def _crd() -> dict:
    return yaml.safe_load(CRD.read_text())


def _version() -> dict:
    (version,) = _crd()["spec"]["versions"]
    return version


def test_names_match_the_operator_constants() -> None:
    crd = _crd()
    assert crd["metadata"]["name"] == f"{c.PLURAL}.{c.GROUP}"
    assert crd["spec"]["group"] == c.GROUP and crd["spec"]["names"]["kind"] == c.KIND
    assert crd["spec"]["names"]["plural"] == c.PLURAL and _version()["name"] == c.VERSION


def test_scale_subresource_and_printer_columns() -> None:
    v = _version()
    assert v["subresources"]["status"] == {}
    assert v["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                                          "labelSelectorPath": ".status.selector"}
    assert [col["name"] for col in v["additionalPrinterColumns"]] == ["Ready", "Phase", "GPU", "Offload", "URL", "Age"]


def _defaults(schema: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for name, prop in (schema.get("properties") or {}).items():
        path = f"{prefix}{name}"
        if "default" in prop and prop["default"] != {}:
            out[path] = prop["default"]
        out.update(_defaults(prop, path + "."))
    return out


def test_schema_defaults_equal_the_parser_defaults() -> None:
    spec_schema = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    defaults = _defaults(spec_schema)
    parsed = parse_spec({"model": {"name": "llama-3-8b"}}, IMAGES)
    assert defaults == {
        "replicas": parsed.replicas,
        "model.source": parsed.model.source,
        "model.maxContext": parsed.model.max_context,
        "model.dtype": parsed.model.dtype,
        "gpu.count": parsed.gpu.count,
        "gpu.resourceName": parsed.gpu.resource_name,
        "gpu.memoryUtilization": parsed.gpu.memory_utilization,
        "cpuOffload.mode": parsed.offload.mode,
        "cpuOffload.kvMemory": "8Gi",
        "cpuOffload.cores": parsed.offload.cores,
        "engine.blockSize": parsed.engine.block_size,
        "engine.maxNumSeqs": parsed.engine.max_num_seqs,
        "engine.maxNumBatchedTokens": parsed.engine.max_num_batched_tokens,
        "engine.maxWaiting": parsed.engine.max_waiting,
        "engine.logLevel": parsed.engine.log_level,
        "images.pullPolicy": parsed.images.pull_policy,
        "service.type": parsed.service_type,
        "shutdownGraceSeconds": parsed.shutdown_grace_seconds,
        "networkPolicy.enabled": parsed.network_policy.enabled,
        "disruptionBudget.enabled": parsed.disruption_budget.enabled,
        "disruptionBudget.maxUnavailable": parsed.disruption_budget.max_unavailable,
    }
    assert parsed.offload.kv_memory_bytes == 8 << 30


def test_schema_enums_equal_the_parser_choices() -> None:
    props = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    import re

    source = re.compile(props["model"]["properties"]["source"]["pattern"])
    assert [s for s in MODEL_SOURCES if source.match(s)] == list(MODEL_SOURCES)
    for ok in ("hf://acme/qwen-mini", "hf://acme/qwen-mini@v1.2", "hf://a/b@refs/pr/1"):
        assert source.match(ok), ok
    for bad in ("safetensors", "hf://no-slash", "hf://a/b@bad rev", "hf://a/b/c", "HF"):
        assert not source.match(bad), bad
    assert tuple(props["model"]["properties"]["dtype"]["enum"]) == DTYPES
    assert tuple(props["cpuOffload"]["properties"]["mode"]["enum"]) == OFFLOAD_MODES
    assert tuple(props["podTemplate"]["properties"]["spec"]["properties"]) == POD_OVERRIDE_FIELDS


def test_schema_checks_the_new_security_fields() -> None:
    """apiKeySecretRef, shutdownGraceSeconds and networkPolicy are validated at admission too."""
    import jsonschema
    import pytest

    schema = _version()["schema"]["openAPIV3Schema"]
    base = {"model": {"name": "llama-3-8b"}}
    good = {**base, "apiKeySecretRef": {"name": "neo-keys", "key": "api-keys"}, "shutdownGraceSeconds": 45,
            "networkPolicy": {"enabled": True, "from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}],
                              "metricsFrom": []}}
    jsonschema.validate({"spec": good}, schema)
    parse_spec(good, IMAGES)
    for bad in ({"apiKeySecretRef": {"name": "neo-keys"}},
                {"apiKeySecretRef": {"name": "Neo_Keys", "key": "k"}},
                {"shutdownGraceSeconds": -5},
                {"networkPolicy": {"from": []}},
                {"networkPolicy": {"enabled": "yes"}},
                {"networkPolicy": {"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}]}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"spec": {**base, **bad}}, schema)
    described = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for field in ("apiKeySecretRef", "shutdownGraceSeconds", "networkPolicy"):
        assert described[field]["description"]


def _undescribed(node: dict, path: str) -> list[str]:
    """Paths of the properties under ``node`` (array items included) that have no description."""
    out = []
    for key, sub in (node.get("properties") or {}).items():
        here = f"{path}.{key}" if path else key
        if not str(sub.get("description") or "").strip():
            out.append(here)
        out += _undescribed(sub, here)
    for nested in ("items", "additionalProperties"):
        if isinstance(node.get(nested), dict):
            out += _undescribed(node[nested], f"{path}[]")
    return out


def test_every_field_is_described() -> None:
    """`kubectl explain neoservice.spec...` has something to say for every field, status included."""
    schema = _version()["schema"]["openAPIV3Schema"]
    assert schema.get("description")
    assert _undescribed(schema, "") == []
