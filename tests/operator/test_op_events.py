"""Events on condition changes: which changes make one, and what it says."""

from __future__ import annotations

import kubernetes_validate

from neo_operator import status as st
from neo_operator.events import build_event, condition_changes

OWNER = {"metadata": {"name": "llama", "namespace": "team-a", "uid": "u-1", "resourceVersion": "7"}}


def _status(*conds: tuple[str, bool, str, str]) -> dict:
    out: list = []
    for type_, ok, reason, message in conds:
        out = st.set_condition(out, type_, ok, reason, message, now="2024-01-01T00:00:00Z")
    return {"conditions": out}


def test_only_status_or_reason_changes_are_events() -> None:
    old = _status(("SpecValid", True, "Valid", "spec accepted"), ("WorkloadReady", False, "ReplicasNotReady", "0/2 ready"))
    new = _status(("SpecValid", True, "Valid", "spec accepted"), ("WorkloadReady", False, "ReplicasNotReady", "1/2 ready"),
                  ("Sized", False, "NoMatchingNodes", "no node"))
    assert [c["type"] for c in condition_changes(old, new)] == ["Sized"]  # a new message alone is no event
    newer = _status(("SpecValid", False, "InvalidSpec", "spec.x: bad"), ("WorkloadReady", False, "RollingUpdate", "0/2"))
    assert [c["type"] for c in condition_changes(new, newer)] == ["SpecValid", "WorkloadReady"]
    assert [c["type"] for c in condition_changes(None, old)] == ["SpecValid", "WorkloadReady"]
    assert condition_changes(old, old) == []


def test_event_names_the_condition_and_is_a_valid_core_v1_event() -> None:
    (bad,) = _status(("Sized", False, "KvMemoryExceedsNode", "lower spec.cpuOffload.kvMemory " + "x" * 2000))["conditions"]
    event = build_event(OWNER, bad, now="2024-01-01T00:00:00Z")
    assert event["type"] == "Warning" and event["reason"] == "KvMemoryExceedsNode"
    assert event["message"].startswith("Sized is False: lower spec.cpuOffload.kvMemory") and len(event["message"]) == 1024
    assert event["involvedObject"] == {"apiVersion": "neo.serving.io/v1alpha1", "kind": "NeoService", "name": "llama",
                                       "namespace": "team-a", "uid": "u-1", "resourceVersion": "7"}
    assert event["metadata"]["name"].startswith("llama.") and event["metadata"]["namespace"] == "team-a"
    kubernetes_validate.validate(event, "1.25.0", strict=True)
    (good,) = _status(("Ready", True, "Ready", "serving"))["conditions"]
    assert build_event(OWNER, good)["type"] == "Normal"
    assert build_event(OWNER, good)["metadata"]["name"] != build_event(OWNER, good)["metadata"]["name"]
