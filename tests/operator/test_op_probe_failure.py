"""A failed bandwidth probe: one pod per Job, the failure read from the Job and its pod, retried with
backoff by replacing the Job, which pulls its image with the configured imagePullSecrets."""

from __future__ import annotations

from neo_operator import constants as c
from neo_operator.probejob import build_probe_job, probe_failure, probe_retry_delay

NODE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-1", "uid": "u1"}}


def test_probe_job_runs_once_and_carries_pull_secrets_and_its_attempt() -> None:
    job = build_probe_job(NODE, "reg.example/neo/cpu-attention:1", "neo-system", attempt=3,
                          image_pull_secrets=["regcred"])
    assert job["spec"]["backoffLimit"] == 0  # the operator retries, so each failure is seen
    assert job["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert job["metadata"]["annotations"][c.PROBE_ATTEMPT_ANNOTATION] == "3"
    assert "imagePullSecrets" not in build_probe_job(NODE, "img", "neo-system")["spec"]["template"]["spec"]


def test_failure_names_the_jobs_reason_and_what_the_probe_said() -> None:
    job = build_probe_job(NODE, "img", "neo-system", attempt=2)
    assert probe_failure(job, []) is None  # running
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                     "message": "Job has reached the specified backoff limit",
                                     "lastTransitionTime": "2024-01-01T00:00:10Z"}]}
    pod = {"status": {"phase": "Failed", "containerStatuses": [{"name": "probe", "state": {"terminated": {
        "exitCode": 1, "reason": "Error", "message": "ConfigError: no AVX2 on this CPU\n"}}}]}}
    f = probe_failure(job, [pod])
    assert (f.node, f.attempt, f.reason) == ("gpu-1", 2, "BackoffLimitExceeded")
    assert "no AVX2 on this CPU" in f.message and "backoff limit" in f.message
    assert f.failed_at == 1704067210.0
    assert "attempt 2" in f.describe(10.0) and "after 20 s" in f.describe(10.0)


def test_retry_backoff_doubles_up_to_an_hour() -> None:
    assert [probe_retry_delay(a, 10.0) for a in (1, 2, 3)] == [10.0, 20.0, 40.0]
    assert probe_retry_delay(30, 10.0) == 3600.0


def test_a_replacement_job_keeps_the_failure_until_a_probe_succeeds() -> None:
    """While the retry runs, the NeoService keeps saying why the probe failed (a replacement Job that is
    merely pending would otherwise read as 'waiting for the probe', as if nothing had happened)."""
    failed = probe_failure({**build_probe_job(NODE, "img", "neo-system", attempt=1), "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "no AVX2",
         "lastTransitionTime": "2024-01-01T00:00:10Z"}]}}, [])
    retry = build_probe_job(NODE, "img", "neo-system", attempt=2, last_failure=failed)
    running = probe_failure(retry, [])
    assert running is not None and running.retrying and (running.reason, running.attempt) == ("BackoffLimitExceeded", 1)
    assert "no AVX2" in running.describe(10.0) and "attempt 2 is running" in running.describe(10.0)
    retry["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    assert probe_failure(retry, []) is None, "a probe that succeeded ends the failure"
