"""`neo gpu-worker --tensor-parallel-size 2` as a real process pair, driven over its ZeroMQ socket."""

from __future__ import annotations

import subprocess
import sys

import pytest
import zmq

from neo_common.procs import descendants, pid_alive
from neo_common.protocol import PLACEHOLDER_TOKEN, GrammarBitmask, Hello, IterationResult, Shutdown, WorkerError, WorkerReady, decode
from support.plans import PROMPTS, deferred, only, plan
from support.replica import reap, wait_until

pytestmark = pytest.mark.integration


def recv(sock: zmq.Socket, timeout_s: float = 120):
    assert sock.poll(int(timeout_s * 1000)), "no answer from the worker (a rank hung?)"
    return decode(sock.recv())


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
        masks_follow_on_rank_0_alone(sock)
        sock.send(Shutdown(reason="test").encode())
        assert proc.wait(timeout=60) == 0
        # rank 1 and multiprocessing's resource tracker go when rank 0 does (the tracker notices its
        # pipe closing a moment later)
        assert wait_until(lambda: not any(pid_alive(p) for p in tree), 15), "a child outlived rank 0"
        text = (tmp_path / "worker.log").read_text(errors="replace")
        errors = [line for line in text.splitlines() if " ERROR " in line]
        assert [e.split("neo_gpu_worker.")[-1] for e in errors] == ["serve_loop: iteration 4 failed: Traceback (most "
                                                                   "recent call last):"], text[-2000:]
        assert text.count("Traceback") == 1, "only the plan whose masks never came failed"
    finally:
        reap(proc, tree)
        sock.close(0)
        ctx.term()
        log.close()


def masks_follow_on_rank_0_alone(sock: zmq.Socket) -> None:
    """Deferred grammar masks with a follower rank: they go to rank 0 alone, which samples under
    them; a plan whose masks never come fails alone and both ranks go on (rank 0 still samples it,
    unmasked, so the follower's broadcast of its tokens is matched)."""
    lens = [len(p) for p in PROMPTS]
    sock.send(plan(1, PROMPTS, [0, 0]).encode())
    first = recv(sock)
    assert isinstance(first, IterationResult), first
    sock.send(plan(2, [[int(t)] for t in first.token_ids], lens).encode())
    sock.send(deferred(plan(3, [[PLACEHOLDER_TOKEN]] * 2, [n + 1 for n in lens])).encode())
    assert isinstance(recv(sock), IterationResult)
    sock.send(GrammarBitmask(iteration_id=3, bitmask=only([42, 4242], 49152)).encode())
    third = recv(sock)
    assert isinstance(third, IterationResult) and third.token_ids.tolist() == [42, 4242]
    sock.send(deferred(plan(4, [[PLACEHOLDER_TOKEN]] * 2, [n + 2 for n in lens])).encode())
    sock.send(plan(5, [[42], [4242]], [n + 2 for n in lens]).encode())    # plan 4's masks never come
    failed, fifth = recv(sock), recv(sock)
    assert isinstance(failed, WorkerError) and failed.iteration_id == 4 and "never came" in failed.message
    assert isinstance(fifth, IterationResult) and fifth.iteration_id == 5
    sock.send(plan(6, [[int(t)] for t in fifth.token_ids], [n + 3 for n in lens]).encode())
    assert isinstance(recv(sock), IterationResult), "both ranks still run plans"
