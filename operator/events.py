"""core/v1 Events on a NeoService: one per condition change, so `kubectl describe neo` and
`kubectl get events` tell what happened and when, not only the latest state.

Pure here (what changed, what the Event says); :class:`neo_operator.kube.Kube` writes them.
"""

from __future__ import annotations

import enum
import uuid
from typing import Any, Mapping

from neo_operator import constants as c
from neo_operator import status as st

MESSAGE_LIMIT = 1024  # events.k8s.io refuses longer notes; core/v1 readers truncate anyway


class EventType(str, enum.Enum):
    NORMAL = "Normal"
    WARNING = "Warning"


def condition_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[dict[str, str]]:
    """The conditions of ``new`` whose status or reason differs from ``old`` (a message-only change,
    such as a replica count in WorkloadReady, is not an event), in the order of the condition types."""
    before = {cond["type"]: cond for cond in (old or {}).get("conditions") or []}
    changed = []
    for cond in new.get("conditions") or []:
        prev = before.get(cond["type"])
        if prev is None or (prev.get("status"), prev.get("reason")) != (cond.get("status"), cond.get("reason")):
            changed.append(dict(cond))
    return changed


def build_event(owner: Mapping[str, Any], cond: Mapping[str, Any], now: str | None = None) -> dict[str, Any]:
    """The core/v1 Event for one condition change of the NeoService ``owner``: Normal when it became
    True, Warning when False; the reason is the condition's, the message says which condition."""
    meta = owner["metadata"]
    ok = cond.get("status") == "True"
    when = now or st.now_iso()
    message = f"{cond['type']} is {cond.get('status')}: {cond.get('message', '')}"
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": c.API_VERSION, "kind": c.KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid"),
                           "resourceVersion": meta.get("resourceVersion")},
        "reason": str(cond.get("reason") or cond["type"]),
        "message": message[:MESSAGE_LIMIT],
        "type": (EventType.NORMAL if ok else EventType.WARNING).value,
        "firstTimestamp": when,
        "lastTimestamp": when,
        "count": 1,
        "source": {"component": c.MANAGED_BY},
        "reportingComponent": c.MANAGED_BY,
        "reportingInstance": c.MANAGED_BY,
    }
