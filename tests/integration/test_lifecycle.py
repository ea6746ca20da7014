"""`neo serve` as a process tree: Ctrl-C stops every child; a crashed worker makes the service
unhealthy, fails in-flight requests promptly, and the launcher exits non-zero instead of hanging."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from support.replica import descendants, http_status, pid_alive, wait_until

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


def test_ctrl_c_stops_every_child(replica_factory):
    r = replica_factory("--num-gpu-blocks", "32")
    children = descendants(r.proc.pid)
    assert len(children) >= 2
    for pid in children:  # every child starts with NVLink multicast off, whatever the caller's env
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        assert env[b"NCCL_NVLS_ENABLE"] == b"0" and env[b"TORCH_SYMM_MEM_DISABLE_MULTICAST"] == b"1"
    r.proc.send_signal(signal.SIGINT)
    assert r.proc.wait(timeout=30) == 0
    assert wait_until(lambda: not any(pid_alive(p) for p in children), 15)


def _long_request(url: str) -> tuple[threading.Thread, dict]:
    """A 400-token completion on a thread; ``result`` gets its status (or the client error's name
    when the gateway itself goes first), body and elapsed time."""
    result: dict = {}

    def long_request() -> None:
        t0 = time.monotonic()
        try:
            resp = httpx.post(url + "/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": "Tell a long story.", "max_tokens": 400, "temperature": 0,
                "ignore_eos": True})
            result["status"], result["body"] = resp.status_code, resp.text
        except httpx.HTTPError as exc:
            result["status"] = type(exc).__name__
        result["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=long_request)
    t.start()
    return t, result


def test_killed_worker_fails_in_flight_requests_and_the_launcher_exits_nonzero(replica_factory):
    r = replica_factory("--num-gpu-blocks", "64", "--max-worker-restarts", "0")
    worker = httpx.get(r.url + "/health").json()["workers"]["gpu_worker"]["pid"]
    t, result = _long_request(r.url)
    time.sleep(3.0)  # mid-decode
    os.kill(worker, signal.SIGKILL)
    t.join(timeout=60)
    assert not t.is_alive(), "the in-flight request hung after the worker died"
    assert result["status"] != 200 and result["elapsed"] < 60
    assert r.proc.wait(timeout=30) != 0
    assert wait_until(lambda: not any(pid_alive(p) for p in descendants(r.proc.pid)), 15)


def test_gateway_reports_unhealthy_while_the_worker_is_down(tmp_path):
    """Gateway alone (as in a pod whose worker container crashed): /health is 503 until a worker comes."""
    import subprocess
    import sys

    from support.replica import free_ports

    port, wport = free_ports(1, 1)
    args = ["--port", str(port), "--worker-addr", f"tcp://127.0.0.1:{wport}", "--num-gpu-blocks", "32"]
    log = open(tmp_path / "gw.log", "wb")
    gw = subprocess.Popen([sys.executable, "-m", "neo_common.cli", "gateway", *args], stdout=log, stderr=log)
    worker = None
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: http_status(url + "/health") == 503, 60)
        resp = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert resp.status_code == 503 and resp.headers.get("retry-after")
        worker = subprocess.Popen([sys.executable, "-m", "neo_common.cli", "gpu-worker", *args], stdout=log, stderr=log)
        assert wait_until(lambda: http_status(url + "/ready") == 200, 180)
        worker.kill()
        worker.wait()
        assert wait_until(lambda: http_status(url + "/health") == 503, 10), "a dead worker must turn /health 503 at once"
    finally:
        for p in (gw, worker):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        log.close()


def test_crashed_worker_is_restarted_and_queued_requests_survive(replica_factory):
    r = replica_factory("--num-gpu-blocks", "64", "--max-num-seqs", "1")
    worker = httpx.get(r.url + "/health").json()["workers"]["gpu_worker"]["pid"]
    body = {"model": MODEL, "prompt": "Tell a long story.", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    results: dict = {}

    def post(name: str, payload: dict) -> None:
        t0 = time.monotonic()
        resp = httpx.post(r.url + "/v1/completions", json=payload, timeout=300)
        results[name] = (resp.status_code, time.monotonic() - t0, resp.json())

    running = threading.Thread(target=post, args=("running", body))
    running.start()
    time.sleep(2.0)  # the first request is decoding; with --max-num-seqs 1 the next one must wait
    queued = threading.Thread(target=post, args=("queued", body | {"max_tokens": 5, "prompt": "Hello"}))
    queued.start()
    time.sleep(0.5)
    os.kill(worker, signal.SIGKILL)
    running.join(timeout=60)
    assert not running.is_alive(), "the in-flight request hung after the worker died"
    status, elapsed, payload = results["running"]
    assert status == 500 and "error" in payload and elapsed < 60
    assert wait_until(lambda: http_status(r.url + "/health") == 503, 10) or http_status(r.url + "/ready") == 200
    assert wait_until(lambda: http_status(r.url + "/ready") == 200, 240), "the restarted worker never got ready"
    new_pid = httpx.get(r.url + "/health").json()["workers"]["gpu_worker"]["pid"]
    assert new_pid != worker and r.proc.poll() is None
    queued.join(timeout=240)
    status, _, payload = results["queued"]
    assert status == 200 and payload["usage"]["completion_tokens"] == 5, "the queued request was served after restart"


def _engine_core_pid(launcher_pid: int) -> int:
    for pid in descendants(launcher_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"neo_gateway.core_process" in f.read():
                return pid
    raise AssertionError("no engine core process under the replica")


def test_killed_engine_core_fails_in_flight_requests_and_the_replica_stops_nonzero(replica_factory):
    """The engine core is the gateway's child: killed mid-decode, the request in flight gets an error
    at once (not a hang, not a truncated 200) and the gateway exits 1, so the supervisor sees it."""
    r = replica_factory("--num-gpu-blocks", "64")
    core = _engine_core_pid(r.proc.pid)
    t, result = _long_request(r.url)
    time.sleep(3.0)  # mid-decode
    t_kill = time.monotonic()
    os.kill(core, signal.SIGKILL)
    t.join(timeout=60)
    assert not t.is_alive(), "the in-flight request hung after the engine core died"
    assert result["status"] == 500 and "engine core exited" in result["body"], result
    assert time.monotonic() - t_kill < 30
    assert r.proc.wait(timeout=30) != 0
    assert wait_until(lambda: not any(pid_alive(p) for p in descendants(r.proc.pid)), 15)


def test_a_stopped_engine_core_is_reported_and_recovers(replica_factory):
    """A wedged core (here SIGSTOP) must not look healthy while requests hang there: once it has
    been silent for CORE_SILENCE_S, /health and /ready answer 503 and new requests are refused;
    resumed, it serves again."""
    from neo_common.engine_core_protocol import CORE_SILENCE_S

    r = replica_factory("--num-gpu-blocks", "32")
    core = _engine_core_pid(r.proc.pid)
    os.kill(core, signal.SIGSTOP)
    try:
        assert wait_until(lambda: http_status(r.url + "/health") == 503, CORE_SILENCE_S + 10)
        health = httpx.get(r.url + "/health").json()
        assert "has not answered" in health["reason"] and http_status(r.url + "/ready") == 503
        resp = httpx.post(r.url + "/v1/completions", timeout=10, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert resp.status_code == 503
    finally:
        os.kill(core, signal.SIGCONT)
    assert wait_until(lambda: http_status(r.url + "/health") == 200, 10)
    resp = httpx.post(r.url + "/v1/completions", timeout=60, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert resp.status_code == 200
