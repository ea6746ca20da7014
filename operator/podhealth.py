"""The engine pods' init containers as the kubelet reports them: a failure becomes ``PodsInitialized``.

The ``model-download`` init container of an hf:// model can fail long after the model-inspection Job
succeeded (the token was revoked, the Hub is down, the cache volume is full), and the ``model-check``
one when the model is not on the claim. The kubelet keeps restarting it (CrashLoopBackOff) and the
Deployment only says "0/1 replicas ready"; without this the reason shows in ``kubectl describe pod``
alone. Here each pod's ``initContainerStatuses`` become one condition that says which pod and
container, what the container said (its termination message: ``neo fetch-model`` writes its reason
and the Hub's words there) and what to fix; it turns True again once no pod reports a failing init
container.

Pure: :mod:`neo_operator.handlers` feeds it the pods of one NeoService (the pod watch and every
reconcile pass).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

from neo_operator import model_inspection as mi
from neo_operator.model_fetch import FetchFailure
from neo_operator.model_source import INIT_CONTAINER, HubSpec

CONDITION = "PodsInitialized"
DETAIL_LIMIT = 600  # of a container's own words in the condition (the Event caps the whole at 1024)


class PodFailure(str, enum.Enum):
    """Condition reasons of ``PodsInitialized`` besides the model download's own (``FetchFailure``)."""

    INITIALIZED = "Initialized"  # the True reason
    INIT_CONTAINER_FAILED = "InitContainerFailed"  # a non-zero exit the container did not explain
    IMAGE_PULL_FAILED = "ImagePullFailed"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"  # a Secret/ConfigMap (key) the container reads is missing


# kubelet waiting reasons that mean the container cannot start until something changes
_IMAGE_PULL = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
_CONFIG = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
_FETCH_REASONS = {f.value for f in FetchFailure}


@dataclasses.dataclass(frozen=True)
class InitFailure:
    """One failing init container of one pod: the condition reason, how the kubelet put it, its words."""

    pod: str
    container: str
    reason: str
    state: str  # the kubelet's word: CrashLoopBackOff, Error, ImagePullBackOff, ...
    exit_code: int | None
    restarts: int
    detail: str


def _fetch_line(message: str) -> dict[str, Any] | None:
    """``neo fetch-model``'s result line, if the termination message holds one."""
    line = mi.result_line(message)  # the same parser the inspection uses
    return line if line and line.get("reason") in _FETCH_REASONS else None


def _from_termination(pod: str, cs: Mapping[str, Any], term: Mapping[str, Any], state: str) -> InitFailure:
    message = str(term.get("message") or "").strip()
    line = _fetch_line(message) if cs.get("name") == INIT_CONTAINER else None
    reason = str(line["reason"]) if line else PodFailure.INIT_CONTAINER_FAILED.value
    detail = str(line.get("detail") or "") if line else message
    return InitFailure(pod, str(cs.get("name")), reason, state, term.get("exitCode"), int(cs.get("restartCount") or 0),
                       detail[-DETAIL_LIMIT:])


def container_failure(pod: str, cs: Mapping[str, Any]) -> InitFailure | None:
    """The failure one init container status reports, or None (done, running its first try, waiting to start)."""
    state = cs.get("state") or {}
    last = (cs.get("lastState") or {}).get("terminated")
    restarts = int(cs.get("restartCount") or 0)
    term = state.get("terminated")
    if term is not None:
        if term.get("exitCode") == 0:
            return None
        return _from_termination(pod, cs, term, str(term.get("reason") or "Error"))
    waiting = state.get("waiting")
    if waiting is not None:
        why = str(waiting.get("reason") or "")
        if why in _IMAGE_PULL | _CONFIG:
            reason = PodFailure.IMAGE_PULL_FAILED if why in _IMAGE_PULL else PodFailure.CONTAINER_CONFIG_ERROR
            return InitFailure(pod, str(cs.get("name")), reason.value, why, None, restarts,
                               str(waiting.get("message") or "")[-DETAIL_LIMIT:])
        if last is not None and last.get("exitCode") not in (None, 0):  # CrashLoopBackOff: the last run's words
            return _from_termination(pod, cs, last, why or "Error")
        return None
    # running again after a failure: still failing until this attempt succeeds (no flapping per restart)
    if state.get("running") is not None and last is not None and last.get("exitCode") not in (None, 0) and restarts:
        return _from_termination(pod, cs, last, f"restarted {restarts} time(s), running again")
    return None


def init_failures(pods: list[Mapping[str, Any]]) -> list[InitFailure]:
    """Every failing init container of the live pods (terminating ones do not count), pods by name."""
    out = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
            failure = container_failure(pod["metadata"]["name"], cs)
            if failure is not None:
                out.append(failure)
                break  # later init containers wait for this one
    return out


def fix_for(failure: InitFailure, hub: HubSpec | None) -> str:
    """What the user changes for this failure, naming the spec field or the object."""
    if failure.reason in _FETCH_REASONS and hub is not None:
        return mi.fix_for(failure.reason, hub)
    if failure.reason == PodFailure.IMAGE_PULL_FAILED.value:
        return "the image cannot be pulled; check spec.images and spec.podTemplate.imagePullSecrets"
    if failure.reason == PodFailure.CONTAINER_CONFIG_ERROR.value:
        return ("a Secret or ConfigMap the container reads is missing; create it or fix the reference "
                "(spec.model.hub.tokenSecretRef, spec.env, spec.envFrom)")
    return f"see kubectl logs {failure.pod} -c {failure.container}"


def describe(failure: InitFailure, hub: HubSpec | None) -> str:
    how = failure.state + (f", exit code {failure.exit_code}" if failure.exit_code is not None else "")
    if failure.restarts:
        how += f", {failure.restarts} restart(s)"
    said = f"; it said: {failure.detail}" if failure.detail else ""
    return f"pod {failure.pod}: init container {failure.container} failed ({how}): {fix_for(failure, hub)}{said}"


def pods_condition(pods: list[Mapping[str, Any]], hub: HubSpec | None) -> tuple[bool, str, str]:
    """(ok, reason, message) of ``PodsInitialized`` for the pods of one NeoService."""
    failures = init_failures(pods)
    if not failures:
        live = sum(1 for p in pods if not p["metadata"].get("deletionTimestamp"))
        return True, PodFailure.INITIALIZED.value, f"no failing init container in {live} pod(s)"
    first = failures[0]
    more = f" (and {len(failures) - 1} more pod(s) failing)" if len(failures) > 1 else ""
    return False, first.reason, describe(first, hub) + more
