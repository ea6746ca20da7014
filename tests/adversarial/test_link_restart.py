"""The pod layout, where each process is its own container: a gateway restarted on its own (a
liveness-probe kill, an OOM kill) finds the workers that stayed up, and the replica serves again.

The gateway's end of each link is a ROUTER, which cannot address a worker until the worker speaks,
so a worker must say Hello again when it sees a new connection; the stale socket files of the killed
gateway must not stop the new one from binding.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from support.cost_tables import synthetic
from support.replica import free_port, http_status, wait_until

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


def complete(url: str) -> str:
    resp = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_a_gateway_restarted_alone_finds_the_workers_that_stayed(tmp_path):
    port = free_port()
    tables = synthetic().save(str(tmp_path / "tables.json"))
    args = ["--port", str(port), "--runtime-dir", str(tmp_path / "run"), "--offload-mode", "auto",
            "--num-gpu-blocks", "64", "--num-cpu-blocks", "64", "--kv-cache-dtype", "bfloat16",
            "--max-model-len", "512", "--cpu-threads", "1", "--cost-tables", tables]
    log = open(tmp_path / "pod.log", "wb")
    procs: dict[str, subprocess.Popen] = {}

    def start(role: str) -> None:
        procs[role] = subprocess.Popen([sys.executable, "-m", "neo_common.cli", role, *args], stdout=log,
                                       stderr=subprocess.STDOUT)

    url = f"http://127.0.0.1:{port}"
    try:
        for role in ("gpu-worker", "cpu-attention", "gateway"):
            start(role)
        assert wait_until(lambda: http_status(url + "/ready") == 200, 240), "the pod never got ready"
        before = complete(url)
        os.kill(procs["gateway"].pid, signal.SIGKILL)
        procs["gateway"].wait()
        assert http_status(url + "/health") == -1
        start("gateway")
        assert wait_until(lambda: http_status(url + "/ready") == 200, 60), "the new gateway never found the workers"
        assert complete(url) == before
        assert all(procs[r].poll() is None for r in ("gpu-worker", "cpu-attention")), "a worker was restarted"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
