"""hf:// models: the spec, the init container and inspection Job builders, and the real `neo fetch-model`
command those containers run, against a local stand-in for the Hub (tests/support/hub_standin.py)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import pytest

from neo_common.geometry import GEOMETRIES, ModelGeometry
from neo_operator import constants as c
from neo_operator import model_inspection as mi
from neo_operator.configmap import build_configmap
from neo_operator.deployment import build_deployment
from neo_operator.model_fetch import FetchFailure, HubRef
from neo_operator.model_source import INIT_CONTAINER
from neo_operator.sizing import size
from neo_operator.spec import SpecError

from op_helpers import make_node, make_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from hub_standin import StandinRepo, hub_standin, run_container_locally  # noqa: E402

TOKEN = "hf_standin_token"
# A Qwen2-shaped model no built-in geometry has: the sizing must come from its config.json.
CONFIG = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "num_hidden_layers": 28,
          "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
          "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": True}
FILES = {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": os.urandom(4096),
         "tokenizer.json": b"{}", "nested/extra.txt": b"x"}
HUB = {"tokenSecretRef": {"name": "hf-token", "key": "token"}}


def hub_spec(source: str = "hf://acme/qwen-mini@v1", **hub):
    return make_spec(model={"source": source, "name": "", "hub": {**HUB, **hub}})


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, "1.30", strict=True)


# -- spec ---------------------------------------------------------------------------------------------
def test_hf_uri_parses_into_repo_and_revision() -> None:
    assert HubRef.parse("hf://acme/qwen-mini") == HubRef("acme/qwen-mini", "main")
    assert HubRef.parse("hf://acme/qwen-mini@v1.2").revision == "v1.2"
    spec = hub_spec(endpoint="https://hub.example.com/")
    assert spec.model.hub.ref == HubRef("acme/qwen-mini", "v1") and spec.model.source == "hf"
    assert spec.model.hub.endpoint == "https://hub.example.com" and spec.model.geometry is None
    assert spec.model.name == "acme/qwen-mini"


@pytest.mark.parametrize("model, field", [
    ({"source": "hf://no-slash"}, "model.source"),
    ({"source": "hf://a/b@bad rev"}, "model.source"),
    ({"source": "hf://a/b", "hub": {"endpoint": "ftp://x"}}, "model.hub.endpoint"),
    ({"source": "hf://a/b", "hub": {"tokenSecretRef": {"name": "Bad_Name", "key": "t"}}}, "model.hub.tokenSecretRef.name"),
    ({"source": "hf://a/b", "volume": {"claimName": "c", "path": "p"}}, "model.volume"),
    ({"source": "hf", "config": {"hidden_size": 1}, "volume": {"claimName": "c", "path": "p"}}, "model.config"),
    ({"source": "hf", "geometry": "llama-3-8b", "config": CONFIG, "volume": {"claimName": "c", "path": "p"}},
     "model.config"),
])
def test_bad_hub_specs_name_the_field(model: dict, field: str) -> None:
    with pytest.raises(SpecError) as err:
        make_spec(model=model)
    assert err.value.field == field, str(err.value)


def test_config_in_the_spec_sizes_any_supported_model() -> None:
    """spec.model.config (the model's config.json fields) for a model with no built-in geometry."""
    spec = make_spec(model={"source": "hf", "config": CONFIG, "volume": {"claimName": "models", "path": "qwen"}})
    g = spec.model.geometry
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.architecture) == (28, 2, 128, "Qwen2ForCausalLM")
    d = size(spec, [make_node()])
    assert d.kv_bytes_per_block == 16 * 2 * 28 * 2 * 128 * 2
    assert d.weight_bytes == g.weight_bytes(2)


# -- builders -----------------------------------------------------------------------------------------
def _resolved(spec, commit: str = "c0ffee" * 6 + "abcd"):
    import dataclasses
    g = ModelGeometry.from_dict(mi.status_record(spec.model.hub, {"revision": commit, "geometry":
                                                                     GEOMETRIES["llama-3-8b"].to_dict()})["geometry"])
    hub = dataclasses.replace(spec.model.hub, resolved=commit)
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, geometry=g, hub=hub))


def test_engine_pod_downloads_the_resolved_commit_and_serves_from_the_volume() -> None:
    spec = _resolved(hub_spec(endpoint="https://hub.example.com", cacheSize="40Gi"))
    d = size(spec, [make_node()])
    cm = build_configmap("llm", spec, d, 1)
    dep = build_deployment("llm", spec, d, "h")
    validate(dep)
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["name"] == INIT_CONTAINER
    assert init["command"][:3] == ["neo", "fetch-model", f"hf://acme/qwen-mini@{spec.model.hub.resolved}"]
    assert init["command"][init["command"].index("--dir") + 1] == f"{c.MODEL_MOUNT}/acme/qwen-mini"
    env = {e["name"]: e for e in init["env"]}
    assert env["HF_ENDPOINT"]["value"] == "https://hub.example.com"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert {"name": "model", "emptyDir": {"sizeLimit": "40Gi"}} in pod["volumes"]
    mounts = {ct["name"]: {m["name"]: m for m in ct["volumeMounts"]} for ct in pod["containers"]}
    assert mounts["gpu-worker"]["model"] == {"name": "model", "mountPath": c.MODEL_MOUNT, "readOnly": True}
    assert "readOnly" not in {m["name"]: m for m in init["volumeMounts"]}["model"]
    assert cm["data"]["NEO_MODEL"] == f"{c.MODEL_MOUNT}/acme/qwen-mini" and cm["data"]["NEO_LOAD_FORMAT"] == "hf"
    for ct in pod["containers"]:
        assert "HF_TOKEN" not in {e["name"] for e in ct["env"]}, "the token reaches the init container only"


def test_inspection_job_is_valid_and_named_safely() -> None:
    spec = hub_spec()
    job = mi.build_inspection_job("x" * 253, "ns", spec.model.hub, "img", "IfNotPresent", [{"name": "pull"}])
    validate(job)
    assert len(job["metadata"]["name"]) <= 63
    ct = job["spec"]["template"]["spec"]["containers"][0]
    assert "--config-only" in ct["command"] and ct["securityContext"]["readOnlyRootFilesystem"]
    assert job["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "pull"}]
    other = mi.build_inspection_job("x", "ns", hub_spec("hf://acme/qwen-mini@v2").model.hub, "img", "Always", [])
    assert other["metadata"]["name"] != mi.build_inspection_job("x", "ns", spec.model.hub, "img", "Always", [])[
        "metadata"]["name"], "another revision is inspected again"


def _pod(exit_code: int, message: str) -> dict:
    return {"status": {"containerStatuses": [{"name": "inspect", "state": {"terminated": {
        "exitCode": exit_code, "message": message, "reason": "Error" if exit_code else "Completed",
        "finishedAt": "2024-01-01T00:00:00Z"}}}]}}


def test_inspection_state_reads_the_termination_message() -> None:
    job = {"metadata": {"annotations": {mi.ATTEMPT_ANNOTATION: "2"}}}
    assert mi.inspection_state(job, []) == mi.InspectionState()
    ok = mi.inspection_state(job, [_pod(0, json.dumps({"revision": "abc", "geometry": {"name": "g"}}))])
    assert ok.result == {"revision": "abc", "geometry": {"name": "g"}}
    bad = mi.inspection_state(job, [_pod(1, json.dumps({"reason": "HubUnauthorized", "detail": "401"}))]).failure
    assert (bad.reason, bad.attempt, bad.retrying) == ("HubUnauthorized", 2, False)
    hub = hub_spec().model.hub
    text = mi.describe(bad, hub, 10)
    assert "spec.model.hub.tokenSecretRef" in text and "'hf-token'" in text and "attempt 2" in text
    replaced = {"metadata": {"annotations": {mi.LAST_FAILURE_ANNOTATION: bad.to_json()}}}
    assert mi.inspection_state(replaced, []).failure.retrying
    assert mi.recorded({"model": mi.status_record(hub, ok.result)}, hub) is not None
    assert mi.recorded({"model": mi.status_record(hub, ok.result)}, hub_spec("hf://acme/qwen-mini@v2").model.hub) is None


# -- the real command against the Hub stand-in ---------------------------------------------------------
@pytest.fixture(scope="module")
def hub():
    with hub_standin([StandinRepo("acme/qwen-mini", FILES, refs=("main", "v1"))], TOKEN) as server:
        yield server


def _run(container: dict, hub, token: str, tmp: str) -> tuple[int, dict]:
    container = {**container, "env": [e for e in container["env"] if e["name"] != "HF_ENDPOINT"]
                 + [{"name": "HF_ENDPOINT", "value": hub.url}]}
    code, message = run_container_locally(container, {("hf-token", "token"): token},
                                          {c.MODEL_MOUNT: os.path.join(tmp, "models"), "/tmp": os.path.join(tmp, "tmp")})
    return code, json.loads(message)


def test_init_container_downloads_the_snapshot(hub) -> None:
    spec = hub_spec(endpoint=hub.url)
    commit = StandinRepo("acme/qwen-mini", FILES).commit
    dep = build_deployment("llm", _resolved(spec, commit), size(_resolved(spec, commit), [make_node()]), "h")
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    with tempfile.TemporaryDirectory() as tmp:
        code, result = _run(init, hub, TOKEN, tmp)
        assert code == 0, result
        folder = Path(tmp, "models", "acme", "qwen-mini")
        for name, data in FILES.items():
            assert (folder / name).read_bytes() == data
        assert result["revision"] == commit
        assert ModelGeometry.from_dict(result["geometry"]).num_kv_heads == 2
    assert ("GET", f"/acme/qwen-mini/resolve/{commit}/model.safetensors") in hub.requests


def test_inspection_reads_config_only_and_resolves_the_revision(hub) -> None:
    job = mi.build_inspection_job("llm", "ns", hub_spec().model.hub, "img", "IfNotPresent", [])
    with tempfile.TemporaryDirectory() as tmp:
        code, result = _run(job["spec"]["template"]["spec"]["containers"][0], hub, TOKEN, tmp)
        assert code == 0, result
        assert result["revision"] == StandinRepo("acme/qwen-mini", FILES).commit
        assert sorted(p.name for p in Path(tmp, "tmp", "model").iterdir() if not p.name.startswith(".")) == \
            ["config.json"]


@pytest.mark.parametrize("source, token, reason", [
    ("hf://acme/qwen-mini@v1", "hf_wrong", FetchFailure.UNAUTHORIZED),
    ("hf://acme/qwen-mini@v9", TOKEN, FetchFailure.REVISION_NOT_FOUND),
    ("hf://acme/nothing", TOKEN, FetchFailure.REPO_NOT_FOUND),
])
def test_failures_become_reasons(hub, source: str, token: str, reason: FetchFailure) -> None:
    job = mi.build_inspection_job("llm", "ns", hub_spec(source).model.hub, "img", "IfNotPresent", [])
    with tempfile.TemporaryDirectory() as tmp:
        code, result = _run(job["spec"]["template"]["spec"]["containers"][0], hub, token, tmp)
    assert code == 1 and result["reason"] == reason.value, result
