"""Status conditions and phase."""

from __future__ import annotations

from neo_operator.reconcile import StatusUpdate, workload_update
from neo_operator.status import condition, derive, set_condition, workload_condition


def test_transition_time_kept_while_status_unchanged() -> None:
    conds = set_condition([], "Sized", True, "Sized", "ok", 1, now="2026-01-01T00:00:00Z")
    conds = set_condition(conds, "Sized", True, "Sized", "still ok", 2, now="2026-01-02T00:00:00Z")
    assert condition(conds, "Sized")["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert condition(conds, "Sized")["message"] == "still ok" and condition(conds, "Sized")["observedGeneration"] == 2
    conds = set_condition(conds, "Sized", False, "ModelDoesNotFit", "no", 3, now="2026-01-03T00:00:00Z")
    assert condition(conds, "Sized")["lastTransitionTime"] == "2026-01-03T00:00:00Z"
    assert len(conds) == 1


def _status(**ok: bool | str) -> dict:
    conds: list = []
    for t, v in ok.items():
        reason = v if isinstance(v, str) else ("Ok" if v else "Bad")
        conds = set_condition(conds, t, v is True, reason, f"{t} message")
    return {"conditions": conds}


def test_phases() -> None:
    assert derive(_status(SpecValid="InvalidSpec"))["phase"] == "Failed"
    assert derive(_status(SpecValid=True, ModelAvailable=True, Sized="BandwidthProbePending"))["phase"] == "Pending"
    assert derive(_status(SpecValid=True, ModelAvailable=True, Sized="KvMemoryExceedsNode"))["phase"] == "Failed"
    assert derive(_status(SpecValid=True, ModelAvailable=True, Sized=True, WorkloadReady="ReplicasNotReady"))["phase"] == "Deploying"
    ready = derive(_status(SpecValid=True, ModelAvailable=True, Sized=True, WorkloadReady=True))
    assert ready["phase"] == "Ready" and condition(ready["conditions"], "Ready")["status"] == "True"
    failed = derive(_status(SpecValid=True, ModelAvailable="ModelMissing"))
    ready_cond = condition(failed["conditions"], "Ready")
    assert ready_cond["status"] == "False" and ready_cond["reason"] == "ModelMissing"


def _deployment(replicas: int, ready: int, updated: int, generation: int = 2, observed: int = 2) -> dict:
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": updated}}


def test_workload_condition_follows_the_deployment() -> None:
    assert workload_condition(None)[:2] == (False, "DeploymentMissing")
    assert workload_condition(_deployment(2, 2, 2, generation=3, observed=2))[:2] == (False, "Progressing")
    assert workload_condition(_deployment(2, 2, 1))[:2] == (False, "RollingUpdate")
    assert workload_condition(_deployment(2, 1, 2))[:2] == (False, "ReplicasNotReady")
    assert workload_condition(_deployment(2, 2, 2)) == (True, "AllReplicasReady", "2/2 replicas ready", 2, 2)
    assert workload_condition(_deployment(0, 0, 0))[0] is True


def test_status_update_merges_onto_the_freshest_status() -> None:
    base = derive(_status(SpecValid=True, ModelAvailable=True, Sized=True))
    base["sizing"] = {"gpuKvBlocks": 10}
    new = workload_update(_deployment(1, 1, 1), None).apply(base)
    assert new["phase"] == "Ready" and new["readyReplicas"] == 1 and new["sizing"] == {"gpuKvBlocks": 10}
    assert "observedGeneration" not in new  # following the Deployment is not observing the spec
    upd = StatusUpdate(generation=4).cond("SpecValid", False, "InvalidSpec", "spec.x: bad")
    failed = upd.apply(new)
    assert failed["observedGeneration"] == 4 and failed["phase"] == "Failed"
