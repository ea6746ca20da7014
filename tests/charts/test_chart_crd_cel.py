"""The CRD's CEL rules (x-kubernetes-validations): each names only fields the schema has, each is
evaluated for real (cel-python, a CEL implementation: valid specs pass every rule, each rule's mistake
fails that rule and no other), and each has a twin in the operator's own checks (neo_operator.spec),
which refuse the same mistake on API servers that ignore CEL (before 1.25; the test API server is 1.20).

As the API server does, a spec is first given the schema's defaults (structural defaulting) and then
validated. What cel-python does not do: type-check a rule against the schema at CRD creation, or
price its cost; the rules here use only standard CEL (has, in, size, string, startsWith, endsWith),
none of the Kubernetes-only libraries (quantity, url, lists, regex extensions)."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

from neo_operator.spec import SpecError, parse_spec

CRD = Path(__file__).resolve().parents[2] / "charts" / "neo" / "crds" / "neoservices.neo.serving.io.yaml"
IMAGES = {"gateway": "g", "gpuWorker": "w", "cpuAttention": "c"}
CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 256}
VOLUME = {"claimName": "models", "path": "m"}

# One spec per rule, in the CRD's order, that breaks it (and nothing else).
BREAKS = [
    {"model": {"source": "hf", "geometry": "llama-3-8b", "config": CONFIG, "volume": VOLUME}},
    {"model": {"source": "hf://acme/m", "volume": VOLUME}},
    {"model": {"source": "gguf", "geometry": "llama-3-8b"}},
    {"model": {"source": "hf", "volume": VOLUME}},
    {"model": {"source": "gguf", "geometry": "llama-3-8b", "volume": {"claimName": "models", "path": "m.bin"}}},
    {"model": {"name": "llama-3-8b"}, "networkPolicy": {"from": []}},
    {"model": {"name": "llama-3-8b"}, "cpuOffload": {"mode": "full", "kvMemory": "0"}},
]


@functools.lru_cache(maxsize=1)
def _crd_schema() -> dict:
    """The CRD's openAPIV3Schema (read once: callers do not modify it)."""
    (version,) = yaml.safe_load(CRD.read_text())["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def _spec_schema() -> dict:
    return _crd_schema()["properties"]["spec"]


def _rules() -> list[dict]:
    return _spec_schema()["x-kubernetes-validations"]


def test_every_rule_has_a_message_and_names_existing_fields() -> None:
    schema = _spec_schema()
    for rule in _rules():
        assert set(rule) == {"rule", "message"} and rule["message"].strip(), rule
        assert rule["rule"].count("(") == rule["rule"].count(")"), rule
        for path in re.findall(r"self((?:\.[A-Za-z]+)+)", rule["rule"]):
            node = schema
            for part in path.strip(".").split("."):
                if part in ("startsWith", "endsWith"):
                    break
                assert part in (node.get("properties") or {}), f"{rule['rule']}: no field {path}"
                node = node["properties"][part]


@pytest.mark.parametrize("index", range(len(BREAKS)))
def test_the_operator_refuses_what_each_rule_refuses(index: int) -> None:
    assert len(BREAKS) == len(_rules()), "one breaking example per rule"
    with pytest.raises(SpecError):
        parse_spec(BREAKS[index], IMAGES)


# Specs every rule accepts (and the schema, and the operator): one per kind of model and offload setting.
VALID = [
    {"model": {"name": "llama-3-8b"}},
    {"model": {"source": "hf", "geometry": "llama-3-8b", "volume": VOLUME}},
    {"model": {"source": "hf", "config": CONFIG, "volume": VOLUME}},
    {"model": {"source": "gguf", "geometry": "llama-3-8b", "volume": {"claimName": "models", "path": "m/q4.gguf"}}},
    {"model": {"source": "hf://acme/m@v1", "hub": {"tokenSecretRef": {"name": "hf", "key": "token"}}}},
    {"model": {"source": "hf://acme/m", "config": CONFIG}},
    {"model": {"name": "llama-3-8b"}, "networkPolicy": {"from": [{"podSelector": {}}]}},
    {"model": {"name": "llama-3-8b"}, "cpuOffload": {"mode": "off", "kvMemory": 0}},
    {"model": {"name": "llama-3-8b"}, "cpuOffload": {"mode": "throughput", "kvMemory": "64Gi"}},
]
# More mistakes, each with the one rule (index in the CRD's order) that refuses it.
MORE_BREAKS = [
    (1, {"model": {"source": "hf://acme/m@main", "volume": {"claimName": "models"}}}),
    (2, {"model": {"source": "gguf", "geometry": "llama-3-8b", "volume": {"claimName": "models"}}}),
    (3, {"model": {"source": "gguf", "volume": {"claimName": "models", "path": "m.gguf"}}}),
    (6, {"model": {"name": "llama-3-8b"}, "cpuOffload": {"kvMemory": 0}}),  # mode defaults to auto
    (6, {"model": {"name": "llama-3-8b"}, "cpuOffload": {"mode": "auto", "kvMemory": "0Gi"}}),
]

# networkPolicy.from also has minItems: 1; the rule adds the message saying why (and what to do).
SCHEMA_ALSO_REFUSES = {5}


def with_defaults(value: Any, schema: dict) -> Any:
    """The API server's structural defaulting: an absent property with a ``default`` gets it, and
    defaults apply inside it in turn (so ``cpuOffload: {}`` gains ``mode: auto``)."""
    value = copy.deepcopy(value)
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = with_defaults(value[name], sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [with_defaults(item, schema["items"]) for item in value]
    return value


@functools.lru_cache(maxsize=1)
def _programs() -> list[Any]:
    """Each rule compiled once (parsing is the slow part)."""
    env = celpy.Environment()
    return [env.program(env.compile(rule["rule"])) for rule in _rules()]


def failing_rules(spec: dict) -> list[int]:
    """Indexes of the rules ``spec`` (defaulted) breaks, evaluated with cel-python with ``self`` the spec."""
    activation = {"self": celpy.json_to_cel(with_defaults(spec, _spec_schema()))}
    failing = []
    for index, (rule, program) in enumerate(zip(_rules(), _programs())):
        result = program.evaluate(activation)
        assert isinstance(result, celpy.celtypes.BoolType), (rule["rule"], result)  # never an error
        if not result:
            failing.append(index)
    return failing


def _schema_valid(spec: dict) -> None:
    _validator().validate({"apiVersion": "neo.serving.io/v1alpha1", "kind": "NeoService", "metadata": {"name": "x"},
                           "spec": spec})


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    schema = _crd_schema()
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.mark.parametrize("spec", VALID, ids=range(len(VALID)))
def test_valid_specs_pass_every_rule(spec: dict) -> None:
    _schema_valid(spec)
    parse_spec(spec, IMAGES)  # the operator agrees
    assert failing_rules(spec) == []


@pytest.mark.parametrize("index, spec", [*enumerate(BREAKS), *MORE_BREAKS],
                         ids=[f"rule{i}-{n}" for n, (i, _) in enumerate([*enumerate(BREAKS), *MORE_BREAKS])])
def test_each_mistake_fails_its_rule_and_no_other(index: int, spec: dict) -> None:
    if index in SCHEMA_ALSO_REFUSES:
        with pytest.raises(jsonschema.ValidationError):
            _schema_valid(spec)
    else:
        _schema_valid(spec)  # the schema alone lets it through: only the rule stops it
    assert failing_rules(spec) == [index], _rules()[index]["message"]
    with pytest.raises(SpecError):
        parse_spec(spec, IMAGES)


def test_defaulting_is_what_the_api_server_does() -> None:
    defaulted = with_defaults({"model": {"name": "m"}, "networkPolicy": {"from": [{"podSelector": {}}]}}, _spec_schema())
    assert defaulted["model"]["source"] == "dummy" and defaulted["replicas"] == 1
    assert defaulted["cpuOffload"] == {"mode": "auto", "kvMemory": "8Gi", "cores": 0}
    assert defaulted["networkPolicy"]["enabled"] is True and "images" not in defaulted
