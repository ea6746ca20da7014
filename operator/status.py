"""NeoService status: conditions, phase and the fields the printer columns show.

Pure functions: they take the current status and return the new one, keeping each condition's
lastTransitionTime while its status does not change.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any, Mapping

CONDITION_TYPES = ("SpecValid", "ModelAvailable", "Sized", "PodsInitialized", "WorkloadReady", "Ready")
# Known only once pods exist (the pod watch, a reconcile that wrote the children): its absence does
# not hold Ready back, and it comes before WorkloadReady so Ready names the init container's reason.
OPTIONAL_TYPES = {"PodsInitialized"}
PENDING_REASONS = {"BandwidthProbePending", "BandwidthProbeFailed"}  # both retried by the operator


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(conditions: list[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def set_condition(conditions: list[Mapping[str, Any]], type_: str, ok: bool, reason: str, message: str,
                  generation: int | None = None, now: str | None = None) -> list[dict[str, Any]]:
    status = "True" if ok else "False"
    old = condition(conditions, type_)
    new = {
        "type": type_, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime")
        else (now or now_iso()),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out = [dict(c) for c in conditions if c.get("type") != type_] + [new]
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(c["type"], len(order)))


def workload_condition(deployment: Mapping[str, Any] | None) -> tuple[bool, str, str, int, int]:
    """(ok, reason, message, replicas, readyReplicas) of the Deployment as the controller reports it."""
    if deployment is None:
        return False, "DeploymentMissing", "the Deployment has not been created yet", 0, 0
    desired = int((deployment.get("spec") or {}).get("replicas", 1))
    st = deployment.get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    current = int(st.get("replicas") or 0)
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = st.get("observedGeneration")
    if generation is not None and (observed is None or observed < generation):
        return False, "Progressing", "the Deployment controller has not observed the latest spec yet", current, ready
    if updated < desired:
        return False, "RollingUpdate", f"{updated}/{desired} replicas run the latest spec", current, ready
    if ready < desired:
        return False, "ReplicasNotReady", f"{ready}/{desired} replicas ready", current, ready
    return True, "AllReplicasReady", f"{ready}/{desired} replicas ready", current, ready


def derive(status: Mapping[str, Any], generation: int | None = None) -> dict[str, Any]:
    """Recompute Ready and phase from the other conditions."""
    out = copy.deepcopy(dict(status))
    conds = out.get("conditions") or []
    failing = [c for c in conds if c["type"] in CONDITION_TYPES[:-1] and c.get("status") != "True"]
    missing = [t for t in CONDITION_TYPES[:-1] if t not in OPTIONAL_TYPES and condition(conds, t) is None]
    if failing:
        first = failing[0]
        conds = set_condition(conds, "Ready", False, first["reason"], f"{first['type']}: {first['message']}", generation)
    elif missing:
        conds = set_condition(conds, "Ready", False, "Reconciling", f"not yet known: {', '.join(missing)}", generation)
    else:
        conds = set_condition(conds, "Ready", True, "Ready", "serving", generation)
    out["conditions"] = conds
    blocking = [c for c in failing if c["type"] != "WorkloadReady"]
    if any(c["reason"] not in PENDING_REASONS for c in blocking):
        out["phase"] = "Failed"
    elif blocking:
        out["phase"] = "Pending"
    elif failing or missing:
        out["phase"] = "Deploying"
    else:
        out["phase"] = "Ready"
    return out


def gpu_summary(count: int, products: list[str] | tuple[str, ...]) -> str:
    return f"{count}x {'|'.join(products)}" if products else f"{count}x ?"
