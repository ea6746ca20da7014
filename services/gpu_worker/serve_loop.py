"""The GPU worker's message loop: each plan is launched before the previous one's tokens are awaited.

With async scheduling the gateway sends plan i+1 while the worker runs plan i. A worker that waits
for i's tokens, replies and only then reads i+1 leaves the GPU idle for its own gap: reply, receive,
decode the plan, prepare the inputs (0.77 ms per iteration at batch 256 on an H100, 5.8% of it).
This loop launches i+1 as soon as it arrives (its placeholder tokens are i's tokens, still on the
device) and only then waits for i's tokens and replies, so the device always has the next
iteration queued. Replies leave in plan order; a plan that fails to launch is answered with its
error in its turn.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Callable

import zmq
from opentelemetry.trace import Status, StatusCode

from neo_common import tracing
from neo_common.protocol import (GrammarBitmask, Hello, IterationPlan, IterationResult, ProtocolError, Shutdown,
                                 WorkerError, WorkerKind, WorkerReady, decode)
from neo_gpu_worker.model_runner import ModelRunner
from neo_gpu_worker.parallel import FollowerLinks

log = logging.getLogger(__name__)
_IDLE_S = 0.2   # how often an idle worker looks whether the gateway reconnected
_tracer = tracing.tracer("neo.gpu_worker")


def _spin_s(runner: ModelRunner) -> float:
    """How often a loop looks at its socket and the in-flight iteration while both are quiet: often
    on a GPU, where an iteration takes milliseconds and the reply should leave the moment it is done."""
    return 50e-6 if runner.device.type == "cuda" else 1e-3


class _InFlight:
    """A launched plan whose reply is not sent yet: ``launched`` (None if the launch raised
    ``error``), its trace span (None when untraced), and whether it was launched ``ahead`` of the
    previous plan's end."""

    def __init__(self, plan: IterationPlan, runner: ModelRunner, previous: "_InFlight | None") -> None:
        self.plan_id = plan.iteration_id
        self.span, self.launched, self.error, self.ahead = None, None, None, False
        behind = previous is not None and not previous.done()
        try:
            self.span = _start_span(plan)
            self.launched = runner.launch(plan)
            self.ahead = behind
        except Exception as exc:
            self._failed(exc)

    def done(self) -> bool:
        return self.launched is None or self.launched.done()

    @property
    def awaits_mask(self) -> bool:
        return self.launched is not None and self.launched.awaits_mask

    def supply(self, msg: GrammarBitmask) -> None:
        """Queue the plan's sampling under the masks that followed it (a failure fails this plan)."""
        if self.launched is None:
            return   # its launch failed already; the reply says why
        try:
            self.launched.supply((msg.bitmask, msg.bitmask_index))
        except Exception as exc:
            self.launched = None
            self._failed(exc)

    def abandon(self) -> None:
        """Its masks will not come (another plan came first): queue its sampling, unmasked, now;
        its reply says it failed (``AwaitingMask``)."""
        if self.launched is not None:
            self.launched.abandon()

    def reply(self) -> IterationResult | WorkerError:
        result = None
        if self.launched is not None:
            try:
                result = self.launched.finish()
                result.launched_ahead = self.ahead
            except Exception as exc:
                self._failed(exc)
        if self.span is not None:
            if result is not None:
                self.span.set_attribute("neo.forward_s", result.forward_s)
            self.span.end()
        if result is not None:
            return result
        return WorkerError(iteration_id=self.plan_id, message=str(self.error), fatal=False)

    def _failed(self, exc: Exception) -> None:
        log.error("iteration %d failed: %s", self.plan_id, traceback.format_exc())
        self.error = exc
        if self.span is not None:
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, str(exc)))


def _start_span(plan: IterationPlan):
    """An iteration span, child of the oldest traced request and linked to the others."""
    if not plan.trace:
        return None
    span = _tracer.start_span("gpu_worker.iteration",
                              context=tracing.context_from_traceparent(plan.trace.get("traceparent")),
                              links=tracing.links_from(plan.trace.get("links", ())))
    span.set_attribute("neo.iteration_id", plan.iteration_id)
    span.set_attribute("neo.batch_size", plan.batch_size)
    span.set_attribute("neo.num_tokens", int(plan.num_tokens.sum()))
    return span


class IterationLoop:
    """Serves one gateway connection until it says Shutdown.

    - ``sock``: the DEALER socket to the gateway; ``ready``: the WorkerReady a (re)started gateway's
      Hello is answered with; ``followers``: the tensor-parallel ranks plans are forwarded to.
    - ``inflight``: the launched plan not replied to yet (at most one: the next plan is launched
      behind it, then it is finished and replied to; with ``launch_ahead`` false, before). A plan
      with deferred grammar masks samples once its ``GrammarBitmask`` comes, which the gateway
      sends before the next plan; replied to without it, it fails.
    - ``launched_ahead``: plans launched while the previous one was still running (in steady
      decoding, every plan; each reply says whether its plan was).
    - ``connects`` (a callable, the gateway connections seen so far) and ``greeted``: the gateway's
      end is a ROUTER, which cannot address a worker that never spoke, so after every reconnection
      (a gateway restarted on its own, as a pod's container is) the idle loop says Hello again.
    """

    def __init__(self, sock: zmq.Socket, runner: ModelRunner, ready: WorkerReady,
                 followers: FollowerLinks | None = None, launch_ahead: bool = True,
                 connects: Callable[[], int] | None = None) -> None:
        self.sock, self.runner, self.ready, self.followers = sock, runner, ready, followers
        self.launch_ahead = launch_ahead
        self.connects = connects
        self.greeted = 1   # the first connection's Hello was sent before loading
        self.inflight: _InFlight | None = None
        self.launched_ahead = 0
        self.spin_s = _spin_s(runner)

    def run(self) -> int:
        while True:
            frame = self._next_frame()
            if frame is None:   # the in-flight plan finished before the next one came
                self._reply()
                continue
            try:
                msg = decode(frame)
            except ProtocolError as exc:
                log.error("dropping unreadable frame: %s", exc)
                self._reply()   # replies stay in order
                self.sock.send(WorkerError(message=str(exc), fatal=False).encode())
                continue
            if self.followers is not None and isinstance(msg, (IterationPlan, Shutdown)):
                self.followers.stopping = isinstance(msg, Shutdown)
                self.followers.forward(frame)
            if isinstance(msg, IterationPlan):
                if self.inflight is not None and self.inflight.awaits_mask:
                    self.inflight.abandon()   # its sampling goes before this plan's work (followers' order)
                if not self.launch_ahead:
                    self._reply()
                launched = _InFlight(msg, self.runner, self.inflight)
                self.launched_ahead += launched.ahead
                self._reply()
                self.inflight = launched
            elif isinstance(msg, GrammarBitmask):
                self._supply(msg)
            elif isinstance(msg, Hello):
                self._reply()
                self.sock.send(self.ready.encode())   # a (re)started gateway asks who is there
            elif isinstance(msg, Shutdown):
                self._reply()
                log.info("shutdown requested: %s (%d plans were launched ahead of the previous one's end)",
                         msg.reason, self.launched_ahead)
                return 0

    def _next_frame(self) -> bytes | None:
        return next_frame(self.sock, self.inflight, self.spin_s, self._greet_if_reconnected)

    def _greet_if_reconnected(self) -> None:
        if self.connects is not None and self.connects() > self.greeted:
            self.greeted = self.connects()
            if self.inflight is not None and self.inflight.awaits_mask:   # the gateway that would send them is gone
                self._reply()
            log.info("gateway reconnected; saying Hello")
            self.sock.send(Hello(kind=WorkerKind.GPU_WORKER, pid=os.getpid()).encode())

    def _supply(self, msg: GrammarBitmask) -> None:
        if self.inflight is None or self.inflight.plan_id != msg.iteration_id or not self.inflight.awaits_mask:
            log.error("dropping the grammar masks of iteration %d: no plan of that id awaits them", msg.iteration_id)
            return
        self.inflight.supply(msg)

    def _reply(self) -> None:
        if self.inflight is not None:
            reply, self.inflight = self.inflight.reply(), None
            self.sock.send(reply.encode(), copy=False)


def next_frame(sock: zmq.Socket, inflight, spin_s: float, idle: Callable[[], None] | None = None) -> bytes | None:
    """The next frame on ``sock``, or None once ``inflight`` (a launch, or None: just wait for a
    frame) is done with no frame waiting; ``idle`` runs every ``_IDLE_S`` while nothing comes (also
    while ``inflight`` runs: a plan awaiting its grammar masks waits on the gateway)."""
    if inflight is None:
        if idle is not None:
            while not sock.poll(int(_IDLE_S * 1000)):
                idle()
        return sock.recv()
    idle_at = time.monotonic() + _IDLE_S
    while not sock.poll(0):
        if inflight.done():
            return None
        if idle is not None and time.monotonic() >= idle_at:   # a plan awaiting masks is never done
            idle()
            idle_at = time.monotonic() + _IDLE_S
        time.sleep(spin_s)
    return sock.recv()


def follow_plans(sock: zmq.Socket, runner: ModelRunner) -> None:
    """A tensor-parallel follower's loop: run every plan rank 0 forwards until Shutdown, each
    launched behind the previous one as rank 0 launches them (else rank 0's collectives would wait
    for this rank to prepare its inputs). A failure is only logged: rank 0 fails the same plan and
    reports it."""
    spin_s = _spin_s(runner)
    launched = None

    def finish() -> None:
        try:
            launched.finish()
        except Exception:
            log.error("iteration failed: %s", traceback.format_exc())

    while True:
        frame = next_frame(sock, launched, spin_s)
        if frame is None:
            finish()
            launched = None
            continue
        msg = decode(frame)
        if isinstance(msg, Shutdown):
            if launched is not None:
                finish()
            return
        try:
            behind = runner.launch(msg)
        except Exception:
            log.error("iteration %d failed: %s", msg.iteration_id, traceback.format_exc())
            behind = None
        if launched is not None:
            finish()
        launched = behind
