"""`neo gpu-worker` as a real process, driven over its ZeroMQ socket the way an async-scheduling
gateway drives it: the next plan is sent before the previous one's reply is read, and the worker
launches it before it waits for the previous one's tokens. Replies must leave in plan order, a
placeholder must take the token its request sampled the iteration before, and a plan that fails to
launch must be answered with its own error in its turn without costing the plan ahead of it.

The worker runs on the CPU device even on a GPU host: there a step takes tens of milliseconds, so
the next plan always arrives while the previous one still runs (on an H100 this small model's step
ends in ~2 ms, often before the next plan is read, and "launched ahead" would be a race). The CUDA
side of a launch ahead is tested on the runner (``test_cuda_graph.py``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
from typing import Iterator

import numpy as np
import pytest
import torch
import zmq

from neo_common.model_source import SMOLLM2_PACKAGE

from neo_common.protocol import (PLACEHOLDER_TOKEN, GrammarBitmask, Hello, IterationPlan, IterationResult, Shutdown,
                                 WorkerError, WorkerReady, decode)
from neo_gpu_worker.serve_loop import IterationLoop
from support.plans import PROMPTS, deferred, only, plan

pytestmark = pytest.mark.integration

BS = 16


class Worker:
    """A worker process and the DEALER socket it connects to."""

    def __init__(self, tmp_path, launch_ahead: bool) -> None:
        self.launch_ahead = launch_ahead
        flags = ["--launch-ahead", str(launch_ahead).lower(), "--device", "cpu"]
        if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
            flags += ["--model", "smollm2-135m", "--load-format", "dummy"]
        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        addr = self.addr = f"ipc://{run}/worker.sock"   # a private directory, as `neo serve` gives its links
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(addr)
        self.log = open(tmp_path / "worker.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "neo_common.cli", "gpu-worker", "--runtime-dir", str(run),
                                      "--num-gpu-blocks", "16", "--max-model-len", "128", *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def recv(self, timeout_s: float = 120):
        assert self.sock.poll(int(timeout_s * 1000)), f"no reply from the worker; its log ends:\n{self.log_tail()}"
        return decode(self.sock.recv())

    def log_tail(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close(0)
        self.ctx.term()
        self.log.close()


@pytest.fixture(params=[True, False], ids=["launch-ahead", "reply-first"])
def worker(tmp_path, request) -> Iterator[Worker]:
    w = Worker(tmp_path, request.param)
    try:
        assert isinstance(w.recv(60), Hello)
        ready = w.recv(180)
        assert isinstance(ready, WorkerReady), f"{ready}; the worker's log ends:\n{w.log_tail()}"
        yield w
    finally:
        w.close()


def test_plans_sent_ahead_are_launched_ahead_and_answered_in_order(worker):
    """With ``--launch-ahead false`` the same exchange gives the same replies, none launched ahead."""
    prompt_lens = [len(p) for p in PROMPTS]
    worker.sock.send(plan(1, PROMPTS, [0, 0]).encode())
    first = worker.recv()
    assert isinstance(first, IterationResult) and not first.launched_ahead
    step1 = [[int(t)] for t in first.token_ids]

    # the gateway's async schedule: plan 2 with real tokens, plan 3 right behind it with placeholders
    # for what plan 2 samples, then a plan whose placeholder names a request plan 3 did not sample
    worker.sock.send(plan(2, step1, prompt_lens).encode())
    worker.sock.send(plan(3, [[PLACEHOLDER_TOKEN]] * 2, [n + 1 for n in prompt_lens]).encode())
    stray = plan(4, [[PLACEHOLDER_TOKEN]] * 2, [n + 2 for n in prompt_lens])
    stray.seq_ids = np.array([0, 7], np.int64)
    worker.sock.send(stray.encode())
    replies = [worker.recv() for _ in range(3)]
    assert [r.iteration_id for r in replies] == [2, 3, 4]
    second, third, failed = replies
    assert isinstance(second, IterationResult) and isinstance(third, IterationResult)
    # plan 3 was queued while plan 2 ran: launched before the reply to plan 2 (unless told otherwise)
    assert third.launched_ahead == worker.launch_ahead
    assert isinstance(failed, WorkerError) and "7" in failed.message and not failed.fatal

    # the same step with the real tokens, sent alone: the placeholders must have been exactly these
    worker.sock.send(plan(5, [[int(t)] for t in second.token_ids], [n + 1 for n in prompt_lens]).encode())
    again = worker.recv()
    assert isinstance(again, IterationResult) and not again.launched_ahead
    assert np.array_equal(again.token_ids, third.token_ids)

    worker.sock.send(Shutdown(reason="test").encode())
    assert worker.proc.wait(timeout=60) == 0


def test_a_plan_whose_masks_follow_samples_under_them_and_fails_alone_without_them(worker):
    """A plan scheduled ahead with grammar-constrained rows (``bitmask_deferred``): the worker
    queues its forward, answers the plan before it, and samples only once the ``GrammarBitmask``
    comes, under those masks. Masks nobody awaits are dropped; a plan answered without its masks
    fails alone and the next plan runs."""
    vocab = 49152
    prompt_lens = [len(p) for p in PROMPTS]
    worker.sock.send(GrammarBitmask(iteration_id=99, bitmask=only([5], vocab)).encode())   # awaited by no plan
    worker.sock.send(plan(1, PROMPTS, [0, 0]).encode())
    first = worker.recv()
    assert isinstance(first, IterationResult) and first.iteration_id == 1
    worker.sock.send(plan(2, [[int(t)] for t in first.token_ids], prompt_lens).encode())
    worker.sock.send(deferred(plan(3, [[PLACEHOLDER_TOKEN]] * 2, [n + 1 for n in prompt_lens])).encode())
    second = worker.recv()
    assert isinstance(second, IterationResult) and second.iteration_id == 2
    assert not worker.sock.poll(1500), "plan 3 must not sample before its masks come"
    worker.sock.send(GrammarBitmask(iteration_id=3, bitmask=only([42, 4242], vocab)).encode())
    third = worker.recv()
    assert isinstance(third, IterationResult) and third.token_ids.tolist() == [42, 4242]

    # plan 4's masks never come: plan 5 behind it makes the worker answer 4 with an error, then 5
    worker.sock.send(deferred(plan(4, [[PLACEHOLDER_TOKEN]] * 2, [n + 2 for n in prompt_lens])).encode())
    worker.sock.send(plan(5, [[42], [4242]], [n + 2 for n in prompt_lens]).encode())
    failed, fifth = worker.recv(), worker.recv()
    assert isinstance(failed, WorkerError) and failed.iteration_id == 4 and "never came" in failed.message
    assert isinstance(fifth, IterationResult) and fifth.iteration_id == 5 and len(fifth.token_ids) == 2
    worker.sock.send(Shutdown(reason="test").encode())
    assert worker.proc.wait(timeout=60) == 0


def test_a_plan_awaiting_masks_does_not_keep_a_restarted_gateway_waiting(worker):
    """The gateway goes away while the worker holds a plan awaiting its masks (a gateway container
    restarted on its own): the worker fails that plan and says Hello to the new one, which can
    then use it (a ROUTER cannot address a worker that never spoke)."""
    prompt_lens = [len(p) for p in PROMPTS]
    worker.sock.send(plan(1, PROMPTS, [0, 0]).encode())
    first = worker.recv()
    worker.sock.send(plan(2, [[int(t)] for t in first.token_ids], prompt_lens).encode())
    worker.sock.send(deferred(plan(3, [[PLACEHOLDER_TOKEN]] * 2, [n + 1 for n in prompt_lens])).encode())
    assert isinstance(worker.recv(), IterationResult)
    worker.sock.close(0)                       # the gateway dies; a new one binds the same address
    worker.sock = worker.ctx.socket(zmq.DEALER)
    worker.sock.setsockopt(zmq.LINGER, 0)
    worker.sock.bind(worker.addr)
    frames = []
    while not any(isinstance(f, Hello) for f in frames):
        frames.append(worker.recv(10))
    assert all(isinstance(f, (Hello, WorkerError)) for f in frames), frames
    worker.sock.send(Hello().encode())         # the new gateway asks who is there
    assert isinstance(worker.recv(), WorkerReady)
    worker.sock.send(plan(4, PROMPTS, [0, 0]).encode())
    again = worker.recv()
    assert isinstance(again, IterationResult) and np.array_equal(again.token_ids, first.token_ids)
    worker.sock.send(Shutdown(reason="test").encode())
    assert worker.proc.wait(timeout=60) == 0


class FakeGpuLaunch:
    """A launch as on a GPU (no GPU here): queued at once, done ``delay_s`` later."""

    awaits_mask = False

    def __init__(self, plan: IterationPlan, delay_s: float) -> None:
        self.plan_id, self.ready_at = plan.iteration_id, time.monotonic() + delay_s

    def done(self) -> bool:
        return time.monotonic() >= self.ready_at

    def finish(self) -> IterationResult:
        time.sleep(max(0.0, self.ready_at - time.monotonic()))
        return IterationResult(iteration_id=self.plan_id)


class FakeGpuRunner:
    """Stands in for a CUDA ModelRunner, whose ``launch`` returns before the work ends and raises
    synchronously for a plan it refuses (on the CPU device the launch runs on a thread instead)."""

    device = torch.device("cuda")

    def __init__(self, refuse: set[int]) -> None:
        self.refuse = refuse

    def launch(self, plan: IterationPlan) -> FakeGpuLaunch:
        if plan.iteration_id in self.refuse:
            raise ValueError(f"plan {plan.iteration_id} refused")
        return FakeGpuLaunch(plan, 0.05)


def test_replies_stay_in_plan_order_around_launch_failures_hellos_and_bad_frames():
    ctx = zmq.Context()
    gateway, worker = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    gateway.bind("inproc://serve-loop")
    worker.connect("inproc://serve-loop")
    ready = WorkerReady(pid=1)
    loop = IterationLoop(worker, FakeGpuRunner(refuse={2}), ready)
    exit_code = []
    thread = threading.Thread(target=lambda: exit_code.append(loop.run()))
    try:
        for frame in (plan(1, [[5]], [3]).encode(), plan(2, [[5]], [4]).encode(), Hello().encode(),
                      b"\xffnot a message", plan(3, [[5]], [5]).encode(), Shutdown(reason="test").encode()):
            gateway.send(frame)
        thread.start()   # every frame is queued before the loop reads the first
        replies = []
        for _ in range(5):
            assert gateway.poll(10_000), f"replies so far: {replies}"
            replies.append(decode(gateway.recv()))
        thread.join(10)
        assert exit_code == [0]
        kinds = [(type(r).__name__, getattr(r, "iteration_id", None)) for r in replies]
        assert kinds == [("IterationResult", 1), ("WorkerError", 2), ("WorkerReady", None), ("WorkerError", -1),
                         ("IterationResult", 3)]
        assert "refused" in replies[1].message and not replies[1].fatal
        assert loop.launched_ahead == 0   # plan 2 never launched; plan 3 came after plan 1's reply
    finally:
        gateway.close(0)
        worker.close(0)
        ctx.term()
