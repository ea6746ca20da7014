"""PodsInitialized: the engine pods' init container statuses (as a kubelet writes them) become one
condition naming the pod, the container, its words and the fix."""

from __future__ import annotations

import json
from typing import Any

from neo_operator.model_fetch import FetchFailure, HubRef
from neo_operator.model_source import INIT_CONTAINER, HubSpec
from neo_operator.podhealth import PodFailure, pods_condition
from neo_operator.reconcile import pods_update
from neo_operator.status import condition, derive

HUB = HubSpec(HubRef.parse("hf://acme/qwen-mini@v1"), token_secret="hf-token", endpoint="http://hub.local")


def pod(name: str, *init: dict[str, Any], deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"initContainerStatuses": list(init)}}


def terminated(code: int, message: str = "", reason: str = "Error") -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": reason, "message": message}}


def status(state: dict[str, Any], last: dict[str, Any] | None = None, restarts: int = 0,
           name: str = INIT_CONTAINER) -> dict[str, Any]:
    return {"name": name, "state": state, "lastState": last or {}, "restartCount": restarts}


def fetch_line(reason: FetchFailure, detail: str) -> str:
    return json.dumps({"reason": reason.value, "detail": detail})


CRASH_LOOP = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s restarting failed container"}}


def test_a_revoked_token_in_crash_loop_names_the_secret() -> None:
    unauthorized = terminated(1, fetch_line(FetchFailure.UNAUTHORIZED, "401 Client Error: Unauthorized"))
    ok, reason, message = pods_condition([pod("qwen-abc", status(CRASH_LOOP, unauthorized, restarts=3))], HUB)
    assert not ok and reason == FetchFailure.UNAUTHORIZED.value
    assert "pod qwen-abc" in message and INIT_CONTAINER in message and "CrashLoopBackOff" in message
    assert "exit code 1" in message and "3 restart(s)" in message
    assert "spec.model.hub.tokenSecretRef" in message and "401 Client Error" in message


def test_the_hub_down_names_the_endpoint_and_a_running_retry_keeps_failing() -> None:
    down = terminated(1, fetch_line(FetchFailure.UNREACHABLE, "ConnectionError: refused"))
    for st in (status(down), status({"running": {}}, down, restarts=1)):  # first exit, then the retry running
        ok, reason, message = pods_condition([pod("p", st)], HUB)
        assert not ok and reason == FetchFailure.UNREACHABLE.value, st
        assert "spec.model.hub.endpoint" in message and "ConnectionError: refused" in message


def test_other_failures_say_what_to_fix() -> None:
    config = {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}}
    ok, reason, message = pods_condition([pod("p", status(config))], HUB)
    assert (ok, reason) == (False, PodFailure.CONTAINER_CONFIG_ERROR.value)
    assert 'secret "hf-token" not found' in message and "tokenSecretRef" in message
    pull = {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}}
    assert pods_condition([pod("p", status(pull))], HUB)[1] == PodFailure.IMAGE_PULL_FAILED.value
    # the model-check container writes its own fix as its termination message
    check = status(CRASH_LOOP, terminated(1, "model folder m not found on PersistentVolumeClaim c; fix spec.model.volume.path"),
                   restarts=2, name="model-check")
    ok, reason, message = pods_condition([pod("p", check)], None)
    assert (ok, reason) == (False, PodFailure.INIT_CONTAINER_FAILED.value) and "fix spec.model.volume.path" in message
    # an OOM-killed download without a result line
    ok, reason, message = pods_condition([pod("p", status(terminated(137, "", "OOMKilled")))], HUB)
    assert (ok, reason) == (False, PodFailure.INIT_CONTAINER_FAILED.value) and "OOMKilled, exit code 137" in message


def test_cleared_when_the_pods_run() -> None:
    down = terminated(1, fetch_line(FetchFailure.UNREACHABLE, "refused"))
    assert pods_condition([], HUB)[0]
    assert pods_condition([pod("p", status({"running": {}}))], HUB)[0]  # the first try, running
    assert pods_condition([pod("p", status({"waiting": {"reason": "PodInitializing"}}))], HUB)[0]
    assert pods_condition([pod("p", status(terminated(0, "{}", "Completed"), down, restarts=2))], HUB)[0]
    assert pods_condition([pod("p", status(CRASH_LOOP, down, restarts=2), deleting=True)], HUB)[0]
    two = [pod("a", status(CRASH_LOOP, down, 1)), pod("b", status(CRASH_LOOP, down, 1)), pod("c", status({"running": {}}))]
    ok, _, message = pods_condition(two, HUB)
    assert not ok and message.startswith("pod a:") and "1 more pod(s)" in message


def test_ready_and_phase_name_the_init_container_failure() -> None:
    conds = {"conditions": [{"type": t, "status": "True", "reason": "Ok", "message": ""}
                            for t in ("SpecValid", "ModelAvailable", "Sized")]
             + [{"type": "WorkloadReady", "status": "False", "reason": "ReplicasNotReady", "message": "0/1"}]}
    assert derive(conds)["phase"] == "Deploying"  # no pod seen yet: PodsInitialized is not awaited
    unauthorized = terminated(1, fetch_line(FetchFailure.UNAUTHORIZED, "401"))
    failed = pods_update([pod("p", status(CRASH_LOOP, unauthorized, 1))], HUB).apply(conds)
    ready = condition(failed["conditions"], "Ready")
    assert failed["phase"] == "Failed" and ready["reason"] == FetchFailure.UNAUTHORIZED.value
    assert ready["message"].startswith("PodsInitialized: pod p")
    cleared = pods_update([pod("p", status(terminated(0, "", "Completed")))], HUB).apply(failed)
    assert condition(cleared["conditions"], "PodsInitialized")["status"] == "True" and cleared["phase"] == "Deploying"
