"""A real `neo serve` replica (offloading on, so both links exist) under hostile peers and faults.

Attacks come from this test process, a local peer of the replica as any other process of its user
would be (the links live in the replica's 0700 runtime directory, which keeps out other users).
The property each test checks is what a client sees: the same greedy answers as before the
attack, /health 200, nothing hung, and the replica back to 200 by itself after a fault.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import time

import httpx
import numpy as np
import pytest
import zmq

from neo_common.protocol import PROTOCOL_VERSION, Hello, IterationResult, MsgType, WorkerKind, WorkerReady
from support.cost_tables import synthetic
from support.replica import Replica, http_status, wait_until

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "List three colors:", "def fibonacci(n):", "Once upon a time"]
# A 16-block GPU pool, so concurrent requests are swapped to the host pool; tables on which CPU
# decoding always pays, so the policy does place them there (the host is this 2-core machine).
OFFLOAD = ["--offload-mode", "auto", "--num-gpu-blocks", "16", "--num-cpu-blocks", "256", "--swap-in-threshold",
           "1.0", "--calibrate-pipeline", "false", "--kv-cache-dtype", "bfloat16", "--max-model-len", "512",
           "--cpu-threads", "1", "--max-num-batched-tokens", "2048"]


def complete(url: str, prompt: str, max_tokens: int = 12, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=180, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})


def answers(url: str) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        resps = list(pool.map(lambda p: complete(url, p), PROMPTS))
    assert all(r.status_code == 200 for r in resps), [r.text for r in resps]
    return [r.json()["choices"][0]["text"] for r in resps]


def rejected(url: str, link: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("neo:link_frames_rejected_total{") and f'link="{link}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    folder = tmp_path_factory.mktemp("link")
    tables = synthetic(cpu_s_per_token=1e-13, cpu_fixed=0.0, lnch=0.0).save(str(folder / "tables.json"))
    env = {"NEO_COST_CACHE_DIR": str(folder / "cost")}
    r = Replica([*OFFLOAD, "--cost-tables", tables, "--worker-timeout-s", "4"], str(folder / "serve.log"), env=env)
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def reference(replica) -> list[str]:
    """The greedy answers before any attack."""
    return answers(replica.url)


def sockets(replica) -> dict[str, str]:
    config = replica.config
    return {"gpu_worker": config.worker_addr, "cpu_attention": config.cpu_attention_addr}


def test_a_port_scan_of_each_link_changes_nothing(replica, reference):
    for addr in sockets(replica).values():
        for _ in range(3):
            with socket.socket(socket.AF_UNIX) as scan:
                scan.connect(addr.removeprefix("ipc://"))
    time.sleep(0.5)
    assert http_status(replica.url + "/health") == 200
    assert answers(replica.url) == reference


def test_a_hijack_attempt_receives_no_plan_and_injects_nothing(replica, reference):
    ctx = zmq.Context()
    rogues = {}
    try:
        for name, addr in sockets(replica).items():
            kind = WorkerKind.GPU_WORKER if name == "gpu_worker" else WorkerKind.CPU_ATTENTION
            rogue = ctx.socket(zmq.DEALER)
            rogue.setsockopt(zmq.LINGER, 0)
            rogue.connect(addr)
            rogue.send(Hello(kind=kind, pid=os.getpid()).encode())
            rogue.send(WorkerReady(kind=kind, pid=os.getpid(), num_gpu_blocks=16, block_size=16, max_model_len=512,
                                   geometry={"vocab_size": 49152}, dtype="bfloat16").encode())
            # forged answers for the next iterations, and junk: a non-map body and a bad dtype
            for i in range(1, 200):
                rogue.send(IterationResult(iteration_id=i, seq_ids=np.arange(4), token_ids=np.zeros(4, np.int32)).encode())
            rogue.send(bytes([MsgType.ITERATION_RESULT]) + b"\x93\x01\x02\x03")
            rogue.send(bytes([MsgType.WORKER_ERROR]) + b"\x81\xa1v" + bytes([PROTOCOL_VERSION]))
            rogues[name] = rogue
        assert answers(replica.url) == reference, "a rogue's tokens reached a client"
        for name, rogue in rogues.items():
            assert not rogue.poll(500), f"the rogue on the {name} link was handed a frame"
            assert wait_until(lambda: rejected(replica.url, name) >= 203, 10), "every rogue frame dropped and counted"
        assert http_status(replica.url + "/health") == 200
    finally:
        for rogue in rogues.values():
            rogue.close(0)
        ctx.term()
    time.sleep(0.5)   # the rogues' disconnects must not mark the real workers down
    assert http_status(replica.url + "/health") == 200 and answers(replica.url) == reference


def test_a_stalled_worker_is_asked_to_register_again_and_the_replica_recovers(replica, reference):
    pid = httpx.get(replica.url + "/health").json()["workers"]["gpu_worker"]["pid"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(complete, replica.url, "A long story:", 200, ignore_eos=True)
        time.sleep(1.0)
        os.kill(pid, signal.SIGSTOP)   # longer than --worker-timeout-s 4
        try:
            assert wait_until(lambda: http_status(replica.url + "/health") == 503, 15)
        finally:
            time.sleep(1.0)
            os.kill(pid, signal.SIGCONT)
        resp = pending.result(timeout=60)
    assert resp.status_code == 500 and "error" in resp.json(), "the stalled request ends with an error, not a hang"
    t0 = time.monotonic()
    assert wait_until(lambda: http_status(replica.url + "/health") == 200, 30), "the replica never recovered"
    recovered_s = time.monotonic() - t0
    assert httpx.get(replica.url + "/health").json()["workers"]["gpu_worker"]["pid"] == pid, "same worker, no restart"
    assert answers(replica.url) == reference
    print(f"recovered {recovered_s:.1f}s after the worker resumed")


def test_a_cpu_attention_crash_fails_only_the_requests_whose_kv_is_on_the_host(replica, reference):
    pids = httpx.get(replica.url + "/health").json()["workers"]
    n = 6
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(complete, replica.url, f"Story {i}:", 160, ignore_eos=True) for i in range(n)]

        def placed() -> tuple[float, float]:
            text = httpx.get(replica.url + "/metrics", timeout=10).text
            vals = {}
            for line in text.splitlines():
                if line.startswith("neo:num_requests_decoding{"):
                    vals["gpu" if 'place="gpu"' in line else "cpu"] = float(line.rsplit(" ", 1)[1])
            return vals.get("gpu", 0), vals.get("cpu", 0)

        assert wait_until(lambda: all(v > 0 for v in placed()), 60, 0.05), "never had requests on both pools"
        on_gpu, on_cpu = placed()
        # stopped first, so the iteration in flight is certainly one waiting on the CPU (mixed rows)
        os.kill(pids["cpu_attention"]["pid"], signal.SIGSTOP)
        time.sleep(1.0)
        os.kill(pids["cpu_attention"]["pid"], signal.SIGKILL)
        resps = [f.result(timeout=180) for f in futures]
    ok = [r for r in resps if r.status_code == 200]
    failed = [r for r in resps if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 160 for r in ok), "a GPU request was cut short"
    assert all(r.status_code == 500 and "cpu_attention" in r.text for r in failed), [r.text for r in failed]
    assert len(ok) >= on_gpu >= 1 and len(failed) <= n - on_gpu, (on_gpu, on_cpu, [r.status_code for r in resps])
    assert wait_until(lambda: http_status(replica.url + "/health") == 200, 120), "cpu_attention never came back"
    assert answers(replica.url) == reference
