"""The model-inspection Job of an hf:// model: learn its commit and geometry before sizing anything.

One Job per NeoService and Hub reference (``<name>-model-<hash>``, in the NeoService's namespace, owned
by it), one pod (``backoffLimit: 0``) running ``neo fetch-model --config-only`` with the pod's own
token and endpoint. Its result line reaches the operator as the container's termination message in
the pod status (the kubelet copies the file there), so the operator needs no access to the Secret and
the pod none to the API server:

- success: ``{"revision": <commit>, "geometry": {...}}`` is recorded in ``status.model`` (with the
  reference it answers for), the Job is deleted, and sizing goes on with that geometry; the engine
  pods' init containers then download exactly that commit;
- failure: ``{"reason": "HubUnauthorized" | "RevisionNotFound" | ..., "detail": ...}`` becomes
  ``ModelAvailable=False`` with that reason and what to fix, nothing else is written, and the Job is
  replaced after a backoff (the token Secret may be fixed without a spec change); the replacement
  carries the failure, so the condition keeps saying it while the retry runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Mapping

from neo_operator import constants as c
from neo_operator.model_fetch import FetchFailure
from neo_operator.model_source import FETCH_TMP, HubSpec, fetch_container
from neo_operator.probejob import _epoch, probe_retry_delay

COMPONENT = "model-inspection"
ATTEMPT_ANNOTATION = f"{c.GROUP}/inspection-attempt"
LAST_FAILURE_ANNOTATION = f"{c.GROUP}/inspection-last-failure"


def inspection_job_name(name: str, hub: HubSpec) -> str:
    """A DNS-1123 label (the job-name label of its pod is at most 63 characters)."""
    digest = hashlib.sha256(json.dumps(hub.key(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{name[:46].rstrip('-.')}-model-{digest}"


def inspection_labels(name: str) -> dict[str, str]:
    return {c.NAME_LABEL: c.APP_NAME, c.INSTANCE_LABEL: name, c.COMPONENT_LABEL: COMPONENT,
            c.MANAGED_BY_LABEL: c.MANAGED_BY}


@dataclasses.dataclass(frozen=True)
class InspectionFailure:
    """A failed inspection: the reason (a ``FetchFailure`` value or the Job's), the Hub's answer, the
    attempt and when it failed."""

    reason: str
    detail: str
    attempt: int
    failed_at: float
    retrying: bool = False

    def to_json(self) -> str:
        return json.dumps({"reason": self.reason, "detail": self.detail[-800:], "attempt": self.attempt,
                           "failed_at": self.failed_at})

    @classmethod
    def of_replaced(cls, text: str) -> "InspectionFailure | None":
        try:
            d = json.loads(text)
            return cls(str(d["reason"]), str(d["detail"]), int(d["attempt"]), float(d["failed_at"]), retrying=True)
        except (ValueError, KeyError, TypeError):
            return None


def fix_for(reason: str, hub: HubSpec) -> str:
    """What the user changes, naming the spec field or the Secret."""
    secret = (f"the key {hub.token_key!r} of Secret {hub.token_secret!r} (spec.model.hub.tokenSecretRef)"
              if hub.token_secret else "a token: set spec.model.hub.tokenSecretRef to a Secret holding one")
    return {
        FetchFailure.UNAUTHORIZED.value: f"the Hub refused access to {hub.ref.repo_id}; put a token that may read it in "
                                         f"{secret} (a gated model also needs its terms accepted on the Hub)",
        FetchFailure.REPO_NOT_FOUND.value: f"no model {hub.ref.repo_id} on the Hub (or it is private and the token cannot "
                                           f"see it); fix spec.model.source or {secret}",
        FetchFailure.REVISION_NOT_FOUND.value: f"{hub.ref.repo_id} has no revision {hub.ref.revision!r}; fix the "
                                               "@revision of spec.model.source (a branch, tag or commit)",
        FetchFailure.UNSUPPORTED.value: "the model's config.json is missing or names an architecture the engine does "
                                        "not serve; choose another model in spec.model.source",
        FetchFailure.UNREACHABLE.value: f"the Hub at {hub.endpoint or 'its default endpoint'} could not be reached; "
                                        "check spec.model.hub.endpoint and the cluster's egress",
    }.get(reason, "see the inspection pod's log")


def describe(failure: InspectionFailure, hub: HubSpec, base_s: float) -> str:
    said = (f"model inspection of {hub.ref.uri} failed ({failure.reason}): {fix_for(failure.reason, hub)}; "
            f"the Hub said: {failure.detail}; attempt {failure.attempt}")
    if failure.retrying:
        return f"{said}, attempt {failure.attempt + 1} is running"
    return f"{said}, retried after {probe_retry_delay(failure.attempt, base_s):.0f} s"


def build_inspection_job(name: str, namespace: str, hub: HubSpec, image: str, pull_policy: str,
                         pull_secrets: list[dict[str, Any]], attempt: int = 1,
                         last_failure: InspectionFailure | None = None) -> dict[str, Any]:
    labels = inspection_labels(name)
    container = fetch_container(hub, image, pull_policy, hub.ref.revision, f"{FETCH_TMP}/model", config_only=True,
                                mounts=[{"name": "tmp", "mountPath": FETCH_TMP}])
    container["name"] = "inspect"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": inspection_job_name(name, hub), "namespace": namespace, "labels": labels,
            "annotations": {ATTEMPT_ANNOTATION: str(attempt),
                            **({LAST_FAILURE_ANNOTATION: last_failure.to_json()} if last_failure else {})},
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": 600,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    **({"imagePullSecrets": pull_secrets} if pull_secrets else {}),
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
        },
    }


def _terminated(pods: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                return term
    return None


def result_line(message: str) -> dict[str, Any] | None:
    for line in reversed((message or "").strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


@dataclasses.dataclass(frozen=True)
class InspectionState:
    """Where a Job stands: ``result`` (the success line), ``failure``, or neither (running)."""

    result: dict[str, Any] | None = None
    failure: InspectionFailure | None = None


def inspection_state(job: Mapping[str, Any] | None, pods: list[Mapping[str, Any]]) -> InspectionState:
    """Read the Job and its pods: the container's result line, or the failure (its reason and the Hub's
    words; the Job's own reason when the pod never ran, e.g. DeadlineExceeded)."""
    if job is None:
        return InspectionState()
    annotations = job["metadata"].get("annotations") or {}
    attempt = int(annotations.get(ATTEMPT_ANNOTATION) or 1)
    term = _terminated(pods)
    if term is not None:
        line = result_line(term.get("message") or "")
        if term.get("exitCode") == 0 and line and "geometry" in line and "revision" in line:
            return InspectionState(result=line)
        if term.get("exitCode") != 0:
            reason = str((line or {}).get("reason") or "InspectionFailed")
            detail = str((line or {}).get("detail") or (term.get("message") or "").strip()[-500:]
                         or f"{term.get('reason')} (exit {term.get('exitCode')})")
            return InspectionState(failure=InspectionFailure(reason, detail, attempt, _epoch(term.get("finishedAt"))))
    failed = next((cnd for cnd in (job.get("status") or {}).get("conditions") or []
                   if cnd.get("type") == "Failed" and cnd.get("status") == "True"), None)
    if failed is not None:
        return InspectionState(failure=InspectionFailure(failed.get("reason") or "Failed", failed.get("message") or "",
                                                         attempt, _epoch(failed.get("lastTransitionTime"))))
    last = annotations.get(LAST_FAILURE_ANNOTATION)
    return InspectionState(failure=InspectionFailure.of_replaced(last) if last else None)


def retry_due(failure: InspectionFailure, base_s: float, now: float | None = None) -> float:
    """Seconds until the failed Job is to be replaced (<= 0: now)."""
    now = time.time() if now is None else now
    return failure.failed_at + probe_retry_delay(failure.attempt, base_s) - now


def status_record(hub: HubSpec, result: Mapping[str, Any]) -> dict[str, Any]:
    """``status.model``: the inspection's answer with the reference it answers for."""
    return {**hub.key(), "revision": str(result["revision"]), "geometry": dict(result["geometry"])}


def recorded(status: Mapping[str, Any] | None, hub: HubSpec) -> dict[str, Any] | None:
    """The ``status.model`` record if it answers for ``hub`` (else the model must be inspected again)."""
    rec = (status or {}).get("model") or {}
    if rec and all(rec.get(k) == v for k, v in hub.key().items()) and rec.get("revision") and rec.get("geometry"):
        return rec
    return None

