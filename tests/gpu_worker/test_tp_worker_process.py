"""`neo gpu-worker --tensor-parallel-size 2` as a real process pair, driven over its ZeroMQ socket."""

from __future__ import annotations

import subprocess
import sys

import pytest
import zmq

from neo_common.procs import descendants, pid_alive
from neo_common.protocol import Hello, Shutdown, WorkerReady, decode
from support.replica import reap, wait_until

pytestmark = pytest.mark.integration


def test_shutdown_reaches_the_follower_and_both_ranks_exit_cleanly(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    addr = f"ipc://{run}/worker.sock"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(addr)
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "neo_common.cli", "gpu-worker", "--runtime-dir", str(run),
                             "--tensor-parallel-size", "2", "--num-gpu-blocks", "32", "--max-model-len", "256"],
                            stdout=log, stderr=subprocess.STDOUT)
    tree: list[int] = []
    try:
        assert sock.poll(60_000), "the worker never said hello"
        assert isinstance(decode(sock.recv()), Hello)
        assert sock.poll(180_000), "the worker never got ready"
        ready = decode(sock.recv())
        assert isinstance(ready, WorkerReady) and ready.pid == proc.pid and ready.num_gpu_blocks == 32
        assert ready.geometry.num_kv_heads == 3, "the gateway sees the whole model, not rank 0's shard"
        tree = descendants(proc.pid)
        assert len([p for p in tree if pid_alive(p)]) >= 1, "rank 1 runs as a child"
        sock.send(Shutdown(reason="test").encode())
        assert proc.wait(timeout=60) == 0
        # rank 1 and multiprocessing's resource tracker go when rank 0 does (the tracker notices its
        # pipe closing a moment later)
        assert wait_until(lambda: not any(pid_alive(p) for p in tree), 15), "a child outlived rank 0"
        text = (tmp_path / "worker.log").read_text(errors="replace")
        assert "Traceback" not in text, text[-2000:]
    finally:
        reap(proc, tree)
        sock.close(0)
        ctx.term()
        log.close()
