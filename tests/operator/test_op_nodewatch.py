"""Which Node changes wake which NeoServices (the pure part of the Node watch)."""

from __future__ import annotations

import copy

from neo_operator import constants as c
from neo_operator.nodewatch import NodeChanges, waits_for_nodes

from op_helpers import node_dict


def _neo(reason: str | None, status: str = "False", deleting: bool = False) -> dict:
    meta = {"name": "x", "namespace": "t", **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})}
    conds = [] if reason is None else [{"type": "Sized", "status": status, "reason": reason}]
    return {"metadata": meta, "status": {"conditions": conds}}


def test_only_sizing_facts_count_as_a_change() -> None:
    changes = NodeChanges()
    node = node_dict("g1", {c.GPU_PRODUCT_LABEL: "NVIDIA-L4"}, {"cpu": "16", "memory": "64Gi"})
    assert changes.changed(node)  # new
    heartbeat = copy.deepcopy(node)
    heartbeat["status"]["conditions"] = [{"type": "Ready", "status": "True", "lastHeartbeatTime": "now"}]
    heartbeat["metadata"]["resourceVersion"] = "999"
    assert not changes.changed(heartbeat)
    more = copy.deepcopy(node)
    more["status"]["allocatable"]["cpu"] = "32"
    assert changes.changed(more)
    relabelled = copy.deepcopy(more)
    relabelled["metadata"]["labels"]["pool"] = "b"
    assert changes.changed(relabelled) and not changes.changed(relabelled)
    measured = copy.deepcopy(relabelled)
    measured["metadata"]["annotations"][c.READ_GBPS_ANNOTATION] = "40"
    assert changes.changed(measured)
    changes.forget("g1")
    assert changes.changed(measured)


def test_which_neoservices_wait_for_nodes() -> None:
    assert waits_for_nodes(_neo("NoMatchingNodes"))
    assert waits_for_nodes(_neo("InsufficientGpus"))
    assert not waits_for_nodes(_neo("BandwidthProbePending"))  # retries by itself
    assert not waits_for_nodes(_neo("Sized", status="True"))
    assert not waits_for_nodes(_neo(None))  # not reconciled yet: its own handler will
    assert not waits_for_nodes(_neo("NoMatchingNodes", deleting=True))
