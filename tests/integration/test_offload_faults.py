"""Faults with offloading on: either worker killed by PID mid-traffic.

In-flight requests end with an error within a bound, /health reports the dead process (503), the
launcher restarts it, the replica serves offloaded requests again (a restarted GPU worker makes a
new shared segment, which the cpu_attention process re-attaches), and no shared-memory segment is
left behind once the replica stops.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from support.replica import http_status, wait_until

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
OFFLOAD = ["--offload-mode", "full", "--num-gpu-blocks", "32", "--num-cpu-blocks", "128",
           "--kv-cache-dtype", "bfloat16", "--cpu-threads", "1", "--max-model-len", "512"]
BOUND_S = 30.0   # an in-flight request must end this soon after its worker died


def segment_path(replica) -> str:
    return f"/dev/shm/{replica.config.shm_name}"


def start_requests(url: str, n: int) -> tuple[list[threading.Thread], dict]:
    results: dict = {}

    def post(i: int) -> None:
        t0 = time.monotonic()
        try:
            resp = httpx.post(url + "/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 400, "temperature": 0,
                "ignore_eos": True})
            results[i] = (resp.status_code, resp.json(), time.monotonic() - t0)
        except httpx.HTTPError as exc:
            results[i] = (-1, str(exc), time.monotonic() - t0)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


@pytest.mark.parametrize("victim", ["cpu_attention", "gpu_worker"])
def test_killed_worker_with_offloading_fails_in_flight_then_serves_again(victim, replica_factory, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("NEO_COST_CACHE_DIR", str(tmp_path / "cost"))
    r = replica_factory(*OFFLOAD)
    shm = segment_path(r)
    assert os.path.exists(shm)
    pids = httpx.get(r.url + "/health").json()["workers"]
    threads, results = start_requests(r.url, 4)
    assert wait_until(lambda: httpx.get(r.url + "/metrics").text.count('place="cpu"} 4.0') > 0, 60), \
        "the requests never decoded on the CPU"
    killed_at = time.monotonic()
    os.kill(pids[victim]["pid"], signal.SIGKILL)
    for t in threads:
        t.join(timeout=BOUND_S + 10)
    assert not any(t.is_alive() for t in threads), "a request hung after its worker died"
    for i, (code, body, elapsed) in results.items():
        assert code == 500 and "error" in body, (i, code, body)
    assert time.monotonic() - killed_at < BOUND_S
    assert wait_until(lambda: http_status(r.url + "/ready") == 200, 240), f"the restarted {victim} never got ready"
    # /ready and /health are two reads of the engine core's state while the replica settles (the
    # links' states come from its last status): the restarted worker must be reported healthy soon
    assert wait_until(lambda: http_status(r.url + "/health") == 200, 60), httpx.get(r.url + "/health").text
    health = httpx.get(r.url + "/health").json()
    assert health["workers"][victim]["pid"] != pids[victim]["pid"], health
    resp = httpx.post(r.url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 6, resp.text
    metrics = httpx.get(r.url + "/metrics").text
    assert 'neo:cpu_kv_cache_usage_perc{model_name="smollm2-135m-instruct"} 0.0' in metrics
    r.stop()
    assert not os.path.exists(shm), "the shared-memory segment outlived the replica"
