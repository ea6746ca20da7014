"""The bandwidth probe: a Job per GPU node running the image's own ``neo probe-bandwidth --json``.

The probe pod needs no API access: its one JSON line goes to the container's termination-message
file, which the kubelet copies into the pod status; the operator reads it from the finished pod and
records it under the node's name in the probe results ConfigMap of its own namespace
(:func:`probe_record`), so it never writes Node objects. On failure the file stays empty and
``FallbackToLogsOnError`` puts the log tail (the error) there instead.
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import json
import re
import time
from typing import Any, Mapping

from neo_operator import constants as c

JOB_PREFIX = "neo-bw-probe-"
TERMINATION_LOG = "/dev/termination-log"
# The kubelet reports a successful container's termination message only from the file, not from its
# logs, so stdout goes there (exec keeps the probe's exit status).
PROBE_COMMAND = ["/bin/sh", "-c", f"exec neo probe-bandwidth --json > {TERMINATION_LOG}"]


def probe_job_name(node_name: str) -> str:
    """A DNS-1123 label (<= 63 chars) unique per node."""
    clean = re.sub(r"[^a-z0-9-]", "-", node_name.lower()).strip("-")
    digest = hashlib.sha256(node_name.encode()).hexdigest()[:8]
    return f"{JOB_PREFIX}{clean[: 63 - len(JOB_PREFIX) - 9]}-{digest}".replace("--", "-")


def probe_labels(node_name: str) -> dict[str, str]:
    return {c.NAME_LABEL: c.APP_NAME, c.COMPONENT_LABEL: c.PROBE_COMPONENT, c.MANAGED_BY_LABEL: c.MANAGED_BY,
            c.PROBE_NODE_LABEL: probe_job_name(node_name)}


PROBE_RETRY_MAX_S = 3600.0  # the backoff between replacements of a failing probe Job stops growing here


def probe_retry_delay(attempt: int, base_s: float) -> float:
    """Seconds to wait after the ``attempt``-th probe Job of a node failed before replacing it."""
    return min(PROBE_RETRY_MAX_S, base_s * 2 ** max(0, attempt - 1))


def build_probe_job(node: Mapping[str, Any], image: str, namespace: str, attempt: int = 1,
                    image_pull_secrets: tuple[str, ...] | list[str] = (),
                    last_failure: "ProbeFailure | None" = None) -> dict[str, Any]:
    """A Job pinned to ``node`` (nodeName bypasses the scheduler), tolerating its taints, owned by the Node
    so that deleting the node garbage-collects it. One pod per Job (``backoffLimit: 0``): the operator
    retries a failed probe itself, by replacing the Job with backoff, so the failure is seen and
    reported between attempts. A replacement carries ``last_failure``, so the NeoService keeps saying
    why the probe failed while the retry runs, not "pending" as if nothing had happened."""
    meta = node["metadata"]
    node_name = meta["name"]
    labels = probe_labels(node_name)
    pull = [{"name": name} for name in image_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": probe_job_name(node_name),
            "namespace": namespace,
            "labels": labels,
            "annotations": {c.PROBE_NODE_LABEL: node_name, c.PROBE_ATTEMPT_ANNOTATION: str(attempt),
                            **({c.PROBE_LAST_FAILURE_ANNOTATION: last_failure.to_json()} if last_failure else {})},
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": 900,
            "template": {
                "metadata": {"labels": labels, "annotations": {c.PROBE_NODE_LABEL: node_name}},
                "spec": {
                    "nodeName": node_name,
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    **({"imagePullSecrets": pull} if pull else {}),
                    "tolerations": [{"operator": "Exists"}],
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    # the root filesystem is read-only; the probe's only scratch space is /tmp
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                    "containers": [{
                        "name": "probe",
                        "image": image,
                        "command": list(PROBE_COMMAND),
                        "terminationMessagePath": TERMINATION_LOG,
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
                        "volumeMounts": [{"name": "tmp", "mountPath": c.TMP_MOUNT}],
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                    }],
                },
            },
        },
    }


class ProbeResultError(ValueError):
    """The probe pod finished but its termination message is not a probe result."""


def parse_probe_message(message: str) -> dict[str, Any]:
    """The last JSON object line of the termination message, checked."""
    for line in reversed((message or "").strip().splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        gbps = data.get("read_gbps")
        if not isinstance(gbps, (int, float)) or isinstance(gbps, bool) or gbps <= 0:
            raise ProbeResultError(f"probe result has no positive read_gbps: {line}")
        return data
    raise ProbeResultError(f"no JSON line in the probe's termination message: {message[-200:]!r}")


def probe_pod_result(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """The probe result of a Succeeded pod, None while it has not finished successfully."""
    status = pod.get("status") or {}
    if status.get("phase") != "Succeeded":
        return None
    for cs in status.get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated") or {}
        if cs.get("name") == "probe" and terminated.get("exitCode") == 0:
            return parse_probe_message(terminated.get("message", ""))
    raise ProbeResultError("Succeeded probe pod has no terminated 'probe' container status")


def probe_record(result: Mapping[str, Any], now: float | None = None) -> str:
    """The value stored under the node's name in the probe results ConfigMap."""
    detail = {k: result[k] for k in ("read_gbps", "threads", "cpu_model") if k in result}
    detail["read_gbps"] = round(float(result["read_gbps"]), 1)
    detail["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now if now is not None else time.time()))
    return json.dumps(detail, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ProbeFailure:
    """A node's probe Job that failed: the Job's reason, what the probe said, and when."""

    node: str
    attempt: int
    reason: str
    message: str
    failed_at: float  # epoch seconds
    retrying: bool = False   # the Job that failed was replaced: attempt ``attempt`` + 1 runs now

    def describe(self, base_s: float) -> str:
        said = f"the bandwidth probe of node {self.node} failed ({self.reason}: {self.message}); attempt {self.attempt}"
        if self.retrying:
            return f"{said}; attempt {self.attempt + 1} is running"
        return f"{said}, retried by replacing its Job after {probe_retry_delay(self.attempt, base_s):.0f} s"

    def to_json(self) -> str:
        return json.dumps({"attempt": self.attempt, "reason": self.reason, "message": self.message[-500:],
                           "failed_at": self.failed_at})

    @classmethod
    def of_replaced(cls, node: str, text: str) -> "ProbeFailure | None":
        """The failure a replacement Job carries (None if its annotation does not parse)."""
        try:
            d = json.loads(text)
            return cls(node, int(d["attempt"]), str(d["reason"]), str(d["message"]), float(d["failed_at"]),
                       retrying=True)
        except (ValueError, KeyError, TypeError):
            return None


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return time.time()
    return calendar.timegm(time.strptime(stamp.replace(".000000", "")[:19], "%Y-%m-%dT%H:%M:%S"))


def probe_failure(job: Mapping[str, Any] | None, pods: list[Mapping[str, Any]]) -> ProbeFailure | None:
    """The failure of a probe Job (None while it runs or after it succeeded): the Job's Failed condition,
    with the probe container's own words (its termination message, or the log tail) when there are any."""
    if job is None:
        return None
    failed = next((cnd for cnd in (job.get("status") or {}).get("conditions") or []
                   if cnd.get("type") == "Failed" and cnd.get("status") == "True"), None)
    if failed is None:
        annotations = job["metadata"].get("annotations") or {}
        last = annotations.get(c.PROBE_LAST_FAILURE_ANNOTATION)
        if last and not any(cnd.get("type") == "Complete" and cnd.get("status") == "True"
                            for cnd in (job.get("status") or {}).get("conditions") or []):
            return ProbeFailure.of_replaced(annotations.get(c.PROBE_NODE_LABEL, ""), last)   # retry running
        return None
    said = ""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term:
                said = (term.get("message") or "").strip()[-300:] or f"{term.get('reason')} (exit {term.get('exitCode')})"
    meta = job["metadata"]
    annotations = meta.get("annotations") or {}
    message = failed.get("message") or ""
    if said:
        message = f"{message}; the probe said: {said}" if message else f"the probe said: {said}"
    return ProbeFailure(node=annotations.get(c.PROBE_NODE_LABEL, ""),
                        attempt=int(annotations.get(c.PROBE_ATTEMPT_ANNOTATION) or 1),
                        reason=failed.get("reason") or "Failed", message=message,
                        failed_at=_epoch(failed.get("lastTransitionTime")))
