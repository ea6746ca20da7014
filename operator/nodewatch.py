"""Which Node changes matter to sizing, and which NeoServices they should wake.

A NeoService that could not be sized (no matching node, too few GPUs, too little memory...) is not
retried on a timer: it waits for the spec to change, or for the cluster to. The operator watches
GPU nodes and, when a node appears or changes in a way sizing can see (its labels, allocatable
resources or hand-set bandwidth annotations; not the status heartbeats), reconciles those NeoServices
again, so a node pool that scales up from zero gets the workload without an operator restart.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any, Mapping

from neo_operator import constants as c
from neo_operator.status import PENDING_REASONS, condition


def node_fingerprint(node: Mapping[str, Any]) -> str:
    """A digest of what sizing reads from ``node``."""
    meta = node.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    facts = {
        "labels": meta.get("labels") or {},
        "allocatable": (node.get("status") or {}).get("allocatable") or {},
        "bandwidth": {k: annotations.get(k) for k in (c.READ_GBPS_ANNOTATION, c.PROBE_RESULT_ANNOTATION)},
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def waits_for_nodes(neoservice: Mapping[str, Any]) -> bool:
    """True for a live NeoService whose sizing failed for a reason a node change may fix (not one
    waiting for a probe: that one retries by itself)."""
    meta = neoservice.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    sized = condition((neoservice.get("status") or {}).get("conditions") or [], "Sized")
    return sized is not None and sized.get("status") == "False" and sized.get("reason") not in PENDING_REASONS


def waits_for_probes(neoservice: Mapping[str, Any]) -> bool:
    """True for a live NeoService that is waiting for a bandwidth probe, or was sized without the
    bandwidth of some nodes (``status.sizing.probesPending``): a recorded result concerns it."""
    meta = neoservice.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    status = neoservice.get("status") or {}
    sized = condition(status.get("conditions") or [], "Sized")
    return bool((status.get("sizing") or {}).get("probesPending")) or (
        sized is not None and sized.get("reason") in PENDING_REASONS)


class NodeChanges:
    """The last fingerprint seen per node; thread-safe (kopf runs sync handlers in a thread pool)."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def changed(self, node: Mapping[str, Any]) -> bool:
        """Record ``node``; True when it is new or its sizing facts differ from the last time."""
        name = (node.get("metadata") or {}).get("name", "")
        digest = node_fingerprint(node)
        with self._lock:
            before = self._seen.get(name)
            self._seen[name] = digest
        return before != digest

    def forget(self, name: str) -> None:
        with self._lock:
            self._seen.pop(name, None)
