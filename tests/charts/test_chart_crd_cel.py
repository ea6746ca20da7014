"""The CRD's CEL rules (x-kubernetes-validations): each names only fields the schema has, and each has a
twin in the operator's own checks (neo_operator.spec), which refuse the same mistake on API servers
that ignore CEL (before 1.25; the test API server is 1.20)."""

from __future__ import annotations

import re
from pathlib import Path

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


def _spec_schema() -> dict:
    (version,) = yaml.safe_load(CRD.read_text())["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


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
