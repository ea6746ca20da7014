"""The cpu_attention service loop: ZeroMQ plans from the gateway, doorbells from the GPU worker.

Per ``CpuAttentionPlan`` the process serves, for every layer and every sub-batch with CPU rows, one
job: wait for the slot's doorbell, run the kernel on the slot's staging rows (appending k/v to the
pool), publish completion (see ``segment`` for the protocol). The whole iteration runs in native code
with the GIL released; Python only regains control between time slices to notice a Shutdown. With
tracing on, each iteration serving a traced request is a span (``iteration``).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import zmq

from neo_common import protocol, tracing
from neo_common.config import NeoConfig
from neo_common.enums import CpuState, KvDtypeCode, NativeStatus
from neo_common.link import secure_connect
from neo_common.host_kernel import _native, kernel
from neo_common.procs import pid_alive
from neo_common.segment import ABORT_OFF, KvSegment, SegmentError
from neo_cpu_attention.iteration import ServedIteration, iteration_span
from neo_cpu_attention.request_spans import RequestSpans
from neo_cpu_attention.slots import SlotDesc

log = logging.getLogger(__name__)

HELLO_INTERVAL_S = 1.0
GATEWAY_GRACE_MAX_S = 10.0  # a departed gateway's grace is at most this (or --worker-timeout-s)
POLL_MS = 100               # the idle loop's socket poll
CURRENT_CHECK_S = 0.5       # how often an idle process checks that its segment was not replaced
SLICE_US = 200_000          # native serve slice; between slices we look at the socket
SPIN_US = 2_000             # spin this long on a doorbell before sleep-polling


class CpuAttentionServer:
    """One cpu_attention process.

    Fields (and when they change):
    - ``config``: the replica's NeoConfig (fixed).
    - ``segment``: the attached KvSegment, None until the GPU worker has created it (attached lazily,
      then fixed until exit).
    - ``threads``: kernel pool size (fixed at start; ``--cpu-threads``, or the rank's share of them).
    - ``gateway_seen``: True once any frame arrived from the gateway (stops the Hello resends).
    - ``connected`` / ``disconnected_at``: TCP state of the gateway link from the socket monitor;
      after ``gateway_grace_s`` without a connection the process exits (the gateway is gone).
    - ``stopping``: set by Shutdown or SIGTERM/SIGINT; the loop exits at the next check.
    - ``iterations`` / ``jobs``: counters of served plans and (layer, sub-batch) jobs.
    - ``_pending``: frames that arrived while an iteration ran (served next, in order).
    - ``request_spans``: with tracing on, the traced requests' open ``cpu_attention.request`` spans.
    """

    def __init__(self, config: NeoConfig, gateway_grace_s: float | None = None,
                 attach_timeout_s: float = 30.0, threads: int | None = None) -> None:
        self.config = config
        # a gateway that dropped the connection gets this long to come back before we exit
        self.gateway_grace_s = (min(GATEWAY_GRACE_MAX_S, config.ipc.worker_timeout_s) if gateway_grace_s is None
                                else gateway_grace_s)
        self.attach_timeout_s = attach_timeout_s
        self.segment: KvSegment | None = None
        self.threads = kernel.set_num_threads(config.device.cpu_threads if threads is None else threads)
        _native.set_spin_us(SPIN_US)   # pool threads stay hot across the stages of an iteration
        self.gateway_seen = False
        self.connected = False
        self.disconnected_at: float | None = time.monotonic()
        self.stopping = False
        self.iterations = 0
        self.jobs = 0
        self._pending: list[bytes] = []   # frames read while an iteration was running
        self.request_spans = RequestSpans() if tracing.enabled() else None
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)

    # -- main loop --------------------------------------------------------------------------------
    def run(self) -> int:
        addr = self.config.cpu_attention_addr
        log.info("cpu_attention pid %d: %d threads, ISA %s, gateway %s, segment %s",
                 os.getpid(), self.threads, kernel.isa(), addr, self.config.shm_name)
        secure_connect(self.sock, addr, self.config.runtime_dir)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        last_hello = last_check = 0.0
        code = 0
        try:
            while not self.stopping:
                now = time.monotonic()
                if not self.gateway_seen and now - last_hello >= HELLO_INTERVAL_S:
                    self._send(protocol.Hello(kind=protocol.WorkerKind.CPU_ATTENTION, pid=os.getpid()))
                    last_hello = now
                if self._gateway_gone(now):
                    log.error("gateway %s unreachable for %.0fs; exiting", addr, now - self.disconnected_at)
                    code = 1
                    break
                if self.segment is not None and now - last_check >= CURRENT_CHECK_S:
                    last_check = now
                    self._drop_if_replaced()
                if self.segment is None:
                    self._try_attach(0.0)
                if self.request_spans is not None:
                    self.request_spans.expire()
                events = dict(poller.poll(POLL_MS))
                if self.monitor in events:
                    self._drain_monitor()
                if self.sock in events or self._pending:
                    self._drain_socket()
        finally:
            self.close()
        return code

    def close(self) -> None:
        if self.request_spans is not None:
            self.request_spans.close()
        if self.segment is not None:
            try:
                self.segment.set_cpu_state(os.getpid(), CpuState.EXITED)
            except Exception:  # the mapping may be half gone at exit; nothing to save
                pass
            self.segment.close()
            if not pid_alive(self.segment.creator_pid):
                self.segment.unlink()   # its GPU worker died without removing it: nobody else will
            self.segment = None
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)

    def request_stop(self, *_args) -> None:
        self.stopping = True

    # -- gateway link -----------------------------------------------------------------------------
    def _send(self, msg: protocol.Message) -> None:
        try:
            self.sock.send(msg.encode(), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("gateway not connected; dropped %s", type(msg).__name__)

    def _gateway_gone(self, now: float) -> bool:
        if self.connected or self.disconnected_at is None:
            return False
        grace = self.gateway_grace_s if self.gateway_seen else self.config.ipc.worker_timeout_s
        return now - self.disconnected_at > grace

    def _drain_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                # a (re)started gateway cannot address us until we speak (its end is a ROUTER):
                # say Hello again until it answers
                self.connected, self.disconnected_at, self.gateway_seen = True, None, False
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                log.warning("gateway disconnected")
                self.connected, self.disconnected_at = False, time.monotonic()

    def _drain_socket(self) -> None:
        while not self.stopping:
            if self._pending:
                frame = self._pending.pop(0)
            else:
                try:
                    frame = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
            self.gateway_seen = True
            try:
                msg = protocol.decode(frame)
            except protocol.ProtocolError as exc:
                log.error("bad frame from gateway: %s", exc)
                self._send(protocol.WorkerError(message=f"cpu_attention: {exc}", fatal=False))
                continue
            if isinstance(msg, protocol.Shutdown):
                log.info("shutdown requested: %s", msg.reason or "-")
                self.stopping = True
            elif isinstance(msg, protocol.CpuAttentionPlan):
                self.serve_plan(msg)
            elif isinstance(msg, protocol.Hello) and self.segment is not None:
                self._send(self._ready())   # the gateway asks us to (re)register
            else:
                log.debug("ignoring %s", type(msg).__name__)

    # -- segment ----------------------------------------------------------------------------------
    def _drop_if_replaced(self) -> None:
        """A restarted GPU worker created a new segment under the same name: let go of the old one
        (attaching the new one follows), else every job would wait on doorbells nobody rings."""
        if self.segment is not None and not self.segment.is_current():
            log.warning("segment %s was replaced (GPU worker restarted); attaching the new one", self.segment.name)
            self.segment.close()
            self.segment = None

    def _try_attach(self, timeout_s: float) -> bool:
        try:
            self.segment = KvSegment.attach(self.config.shm_name, timeout_s, populate=True)
        except SegmentError as exc:
            if timeout_s > 0:
                log.error("%s", exc)
            return False
        self.segment.set_cpu_state(os.getpid(), CpuState.ATTACHED)
        lay = self.segment.layout
        log.info("attached segment %s: %d layers x %d blocks, %d/%d heads, head_dim %d, %s",
                 self.segment.name, lay.num_layers, lay.num_blocks, lay.num_q_heads, lay.num_kv_heads,
                 lay.head_dim, lay.dtype)
        self._send(self._ready())
        return True

    def _ready(self) -> protocol.WorkerReady:
        lay = self.segment.layout
        return protocol.WorkerReady(kind=protocol.WorkerKind.CPU_ATTENTION, pid=os.getpid(),
                                    block_size=lay.block_size, device="cpu", dtype=lay.dtype)

    # -- one iteration ----------------------------------------------------------------------------
    def serve_plan(self, plan: protocol.CpuAttentionPlan) -> ServedIteration:
        """Serve one iteration, under its span when it serves a traced request; returns its account."""
        served = ServedIteration.of(plan)
        with iteration_span(plan) as span:
            served.start_ns = time.time_ns()
            self._serve_plan(plan, served)
            served.end_ns = time.time_ns()
            if span is not None:
                served.record(span)
        if self.request_spans is not None and plan.trace:
            self.request_spans.observe(plan, served)
        return served

    def _serve_plan(self, plan: protocol.CpuAttentionPlan, served: ServedIteration) -> None:
        it, rows = served.iteration_id, served.rows
        if sum(rows) == 0:
            return
        self._drop_if_replaced()
        if self.segment is None and not self._try_attach(self.attach_timeout_s):
            return self._fail(served, f"shared-memory segment {self.config.shm_name} not available")
        seg = self.segment
        lay = seg.layout
        if len(rows) > lay.num_slots or max(rows) > lay.max_rows:
            return self._fail(served, f"plan has sub-batches {rows}; "
                                      f"segment holds {lay.num_slots} x {lay.max_rows} rows")
        keep = []  # arrays whose addresses the native loop uses
        slots: list[SlotDesc] = []
        for s, n in enumerate(rows):
            lens = np.ascontiguousarray(plan.seq_lens[s], dtype=np.int32)
            bt = np.ascontiguousarray(plan.block_tables[s], dtype=np.int32)
            if n and (bt.ndim != 2 or bt.shape[0] != n):
                return self._fail(served, f"sub-batch {s}: block_tables shape {bt.shape} for {n} rows")
            keep += [lens, bt]
            slots.append(SlotDesc.for_slot(seg, s, lens, bt))
        budget_s = self.config.ipc.worker_timeout_s
        started = idle_since = time.monotonic()
        busy_ns = 0
        while True:
            rc, failed, next_layers, slice_busy_ns = _native.serve_iteration(
                seg.address("k_pool"), seg.address("v_pool"), seg.base_address + ABORT_OFF, lay.num_layers,
                lay.num_blocks, lay.num_q_heads, lay.num_kv_heads, lay.head_dim, lay.block_size,
                KvDtypeCode[lay.dtype], lay.attn_scale, it, slots, SPIN_US, SLICE_US)
            busy_ns += slice_busy_ns
            progressed = [sl.next_layer for sl in slots] != list(next_layers)
            slots = [sl._replace(next_layer=nl) for sl, nl in zip(slots, next_layers)]
            if rc != NativeStatus.NO_DOORBELL:  # anything else ends the iteration
                break
            now = time.monotonic()
            if progressed:
                idle_since = now
            if now - idle_since > budget_s:
                break
            self._poll_control()
            if self.stopping:
                log.warning("iteration %d interrupted by shutdown", it)
                return
        served.status = NativeStatus(rc) if rc in set(NativeStatus) else None
        served.jobs = sum(sl.next_layer for sl in slots if sl.rows)   # an idle slot reports every layer done
        served.busy_s = busy_ns / 1e9
        served.wait_s = max(0.0, time.monotonic() - started - served.busy_s)
        self.iterations += 1
        self.jobs += served.jobs
        if rc == NativeStatus.OK:
            return
        if rc == NativeStatus.ABORTED:
            log.info("iteration %d aborted by the GPU worker", it)
            return
        self._fail(served, f"iteration {it} layer {failed}: {kernel.describe(rc)}")

    def _poll_control(self) -> None:
        """Between native slices: notice a Shutdown (other frames are kept for the main loop)."""
        if self.monitor.poll(0):
            self._drain_monitor()
        while self.sock.poll(0):
            frame = self.sock.recv()
            if frame[:1] == bytes([protocol.MsgType.SHUTDOWN]):
                self.stopping = True
                return
            self._pending.append(frame)   # served by the main loop after this iteration

    def _fail(self, served: ServedIteration, message: str) -> None:
        log.error("%s", message)
        served.error = message
        self._send(protocol.WorkerError(iteration_id=served.iteration_id, message=f"cpu_attention: {message}",
                                        fatal=False))


def install_signal_handlers(server: CpuAttentionServer, parent: int | None = None) -> None:
    """SIGTERM/SIGINT stop the process once the gateway has drained (or left, or the launcher is
    gone: neo_common.shutdown), whatever dispositions it inherited."""
    from neo_common.shutdown import SignalStop

    SignalStop("cpu_attention", server.config.http.shutdown_grace_s, lambda: server.connected,
               server.request_stop, parent).install()
