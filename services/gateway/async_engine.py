"""The API server's engine: per-request output streams, detokenization and stop strings, with the
engine core in a child process (docs/design.md, "The engine core").

HTTP handlers add requests and read their streams; one reader task applies the core's messages:
each ``EngineCoreOutputs`` row is detokenized, checked for stop strings and pushed to its request's
queue, so the core's loop never waits on streaming. A stop string ends a request here and becomes
an ``AbortRequests`` to the core, as does a client that leaves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import subprocess
import sys
import time

import numpy as np
import zmq.asyncio
from opentelemetry import trace

from neo_common import tracing
from neo_common.config import NeoConfig
from neo_common.engine_core_protocol import (CORE_SILENCE_S, NO_TOKEN, PARENT_ENV, AbortRequests, AddRequest, EngineCoreOutputs,
                                             EngineStatus, IterationStats, ShutdownCore, StatsRequest, core_address,
                                             decode, finish_code, finish_reason, pair_socket)
from neo_common.link import prepare_runtime_dir
from neo_common.protocol import Message, ProtocolError
from neo_gateway.detokenizer import IncrementalDetokenizer
from neo_gateway.logprobs import TokenLogprob, from_wire
from neo_gateway.request_trace import record_phases
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.sequence import FinishReason
from neo_gateway.structured_output import StructuredOutputManager
from neo_gateway.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

_CORE_STOP_S = 10.0    # the core tells the workers to leave (up to 5 s) before it exits
_STATS_TIMEOUT_S = 2.0


class EngineUnavailable(RuntimeError):
    """No worker can take the request now (503 + Retry-After)."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (429 + Retry-After)."""


@dataclasses.dataclass
class RequestOutput:
    """One step of a request's stream: new text, and the final state once ``finished``.
    ``logprobs``: the entries of ``token_ids`` (when asked); ``prompt_logprobs``: the prompt's, on
    the request's first output only (when asked); ``cumulative_logprob``: over the output so far
    (when logprobs are computed)."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0


class RequestState:
    """One request on the API server's side, from ``submit`` to its last output.

    - ``output_ids``: the tokens received; ``detok``: their text so far (and the stop strings);
      ``queue``: the outputs not read yet by the HTTP handler.
    - ``arrival``/``scheduled_time``/``first_token_time``/``last_token_time``: monotonic times for
      the metrics and the trace phases (the core's clock is the same); ``arrival_ns`` anchors them
      to wall time. ``span``: the request's server span (None when tracing is off).
    - ``finish_reason``: set once it ended (here, or by the core); ``pushed``: an output went out.
    """

    def __init__(self, seq_id: int, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 detok: IncrementalDetokenizer) -> None:
        self.seq_id, self.request_id, self.prompt_ids, self.params = seq_id, request_id, prompt_ids, params
        self.detok = detok
        self.queue: asyncio.Queue = asyncio.Queue()
        self.output_ids: list[int] = []
        self.arrival = time.monotonic()
        self.arrival_ns = time.time_ns()
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.span = None
        self.finish_reason: FinishReason | None = None
        self.prompt_logprobs: list[TokenLogprob] = []
        self.cumulative_logprob = 0.0
        self.pushed = False

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def wall_ns(self, monotonic_time: float) -> int:
        """A monotonic timestamp of this request as epoch nanoseconds (for span start/end times)."""
        return self.arrival_ns + int((monotonic_time - self.arrival) * 1e9)


class RequestStream:
    """Async iterator over one request's outputs; closing it before the end aborts the request."""

    def __init__(self, engine: "AsyncEngine", req: RequestState) -> None:
        self.engine, self.req = engine, req

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.req.is_finished and self.req.queue.empty():
            raise StopAsyncIteration
        return await self.req.queue.get()

    def abort(self) -> None:
        """Abort the request unless it has finished. Synchronous on purpose: it runs in ``finally``
        blocks of cancelled tasks (a client that hung up), where any ``await`` is cancelled again
        before it could run."""
        if not self.req.is_finished:
            self.engine.abort(self.req, FinishReason.ABORT)


class AsyncEngine:
    """The engine as the HTTP handlers see it; the engine core runs in the child process ``core``.

    - ``status``: the core's last ``EngineStatus`` (readiness, limits, counters); None until the
      core first reports. ``requests``: seq_id -> live request.
    - ``structured``: compiles grammars here too, to refuse an invalid one with a 400 before the
      request is queued (the core compiles its own for the masks).
    - ``finished_hooks``: callbacks(request) when a request ends; ``iteration_hooks``:
      callbacks(IterationStats, requests that got a token) per iteration (metrics).
    - ``core_failed``: the core exited without being asked; ``on_core_exit``: callbacks then.
    """

    def __init__(self, config: NeoConfig, tokenizer: TextTokenizer, served_name: str = "") -> None:
        self.config, self.tokenizer, self.served_name = config, tokenizer, served_name
        self.status: EngineStatus | None = None
        self.requests: dict[int, RequestState] = {}
        self.structured = StructuredOutputManager(tokenizer)
        self.finished_hooks: list = []
        self.iteration_hooks: list = []
        self.on_core_exit: list = []
        self.core: subprocess.Popen | None = None
        self.core_failed = False
        self._ids = itertools.count(1)
        self._stats_ids = itertools.count(1)
        self._stats_waiters: dict[int, asyncio.Future] = {}
        self._stopping = False
        self._ctx: zmq.asyncio.Context | None = None
        self._sock = None
        self._tasks: list[asyncio.Task] = []
        self.heard_at = 0.0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the core's socket, start the core, read its messages."""
        prepare_runtime_dir(self.config.runtime_dir)
        self._ctx = zmq.asyncio.Context()
        self._sock = pair_socket(self._ctx)
        self._sock.bind(core_address(self.config.runtime_dir))
        # the core ties its life to this process itself (no preexec_fn: this process has threads)
        self.core = subprocess.Popen([sys.executable, "-m", "neo_gateway.core_process", *self.config.to_args()],
                                     process_group=0, env={**os.environ, PARENT_ENV: str(os.getpid())})
        log.info("started the engine core (pid %d)", self.core.pid)
        self._tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._watch_core())]

    async def stop(self) -> None:
        """Ask the core to stop (it tells the workers to shut down), wait for it, close the socket."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.core is not None and self.core.poll() is None:
            if self.status is not None:   # connected: it reads the request
                self._send(ShutdownCore(reason="the gateway is stopping"))
            else:   # still starting: its signal policy stops it at a second signal
                self.core.terminate()
                await asyncio.sleep(0.2)
                self.core.terminate()
            deadline = time.monotonic() + _CORE_STOP_S
            while self.core.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self.core.poll() is None:
                log.warning("the engine core (pid %d) did not stop in time; killing it", self.core.pid)
                self.core.kill()
                self.core.wait()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._ctx.term()
        self.structured.close()

    async def _watch_core(self) -> None:
        """The core exiting unasked is fatal to this server: every request fails now, and the
        ``on_core_exit`` callbacks stop the server (a supervisor restarts the replica)."""
        while self.core.poll() is None:
            await asyncio.sleep(0.1)
        if self._stopping:
            return
        self.core_failed = True
        log.error("the engine core exited with code %s; failing every request", self.core.returncode)
        self.fail_requests(f"the engine core exited (code {self.core.returncode})", tell_core=False)
        for callback in self.on_core_exit:
            callback()

    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                msg = decode(frame)
            except ProtocolError as exc:
                log.error("dropped a frame from the engine core: %s", exc)
                continue
            self.heard_at = time.monotonic()
            try:
                if isinstance(msg, EngineCoreOutputs):
                    self._on_outputs(msg)
                elif isinstance(msg, EngineStatus):
                    if msg.vocab_size and msg.vocab_size != self.structured.vocab_size:
                        self.structured.bind_vocab(msg.vocab_size)   # the model's, as the core's
                    self.status = msg
                    waiter = self._stats_waiters.pop(msg.request_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(msg)
            except Exception:  # noqa: BLE001 (the reader must outlive a bug in one message)
                log.exception("applying the engine core's %s failed", type(msg).__name__)

    def _send(self, msg: Message) -> None:
        self._sock.send(msg.encode())   # a PAIR without a high-water mark takes it at once

    # -- state ------------------------------------------------------------------------------
    @property
    def loop_alive(self) -> bool:
        """False once the core (or its loop) has ended; /health reports it."""
        return not self.core_failed and (self.status is None or self.status.loop_alive)

    @property
    def core_silent_s(self) -> float:
        """Seconds since the core last said anything (it sends a status every second at least);
        past ``CORE_SILENCE_S`` it is wedged: not ready, and /health says so."""
        return time.monotonic() - self.heard_at if self.status is not None else 0.0

    @property
    def ready(self) -> bool:
        return (self.status is not None and self.status.ready and not self.core_failed and not self._stopping
                and self.core_silent_s < CORE_SILENCE_S)

    @property
    def max_model_len(self) -> int:
        return self.status.max_model_len if self.status is not None else 0

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (the worker's geometry once it reported, else the tokenizer's)."""
        if self.status is not None and self.status.vocab_size:
            return self.status.vocab_size
        return self.tokenizer.vocab_size

    async def fresh_status(self) -> EngineStatus | None:
        """The core's status now (``/metrics``); the last one heard if it does not answer in time."""
        if self.status is None or self.core_failed or self._stopping:
            return self.status
        request_id = next(self._stats_ids)
        waiter = self._stats_waiters[request_id] = asyncio.get_running_loop().create_future()
        self._send(StatsRequest(request_id=request_id))
        try:
            return await asyncio.wait_for(waiter, _STATS_TIMEOUT_S)
        except TimeoutError:
            self._stats_waiters.pop(request_id, None)
            return self.status

    # -- intake -------------------------------------------------------------------------------
    def check_capacity(self, num_tokens: int) -> str | None:
        """Why a request of this many tokens can never run here (None if it can)."""
        s = self.status
        if s is not None and s.gpu_blocks_total and -(-num_tokens // s.block_size) > s.gpu_blocks_total:
            return (f"the request needs {num_tokens} tokens of KV cache but the cache holds "
                    f"{s.gpu_blocks_total * s.block_size}")
        return None

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; raises at once when it cannot be taken, else returns its output stream."""
        if not self.ready:
            raise EngineUnavailable("the GPU worker is not ready")
        # Capacity is the running slots plus the waiting queue: a burst into an idle replica queues
        # briefly before the core admits it to free slots, and must not be refused meanwhile.
        cfg = self.config.scheduler
        if len(self.requests) >= cfg.max_num_seqs + cfg.max_waiting:
            raise EngineOverloaded(f"{len(self.requests)} requests are running or waiting "
                                   f"(capacity {cfg.max_num_seqs} + {cfg.max_waiting})")
        req = RequestState(next(self._ids), request_id, prompt_ids, params,
                           IncrementalDetokenizer.for_params(self.tokenizer, params))
        traceparent = ""
        if tracing.enabled():
            req.span = trace.get_current_span()   # the request's server span (TracingMiddleware)
            traceparent = tracing.traceparent(req.span) or ""
        self.requests[req.seq_id] = req
        self._send(AddRequest(seq_id=req.seq_id, request_id=request_id, prompt_ids=np.asarray(prompt_ids, np.int32),
                              params=params.to_wire(), arrival=req.arrival, traceparent=traceparent))
        return RequestStream(self, req)

    def abort(self, req: RequestState, reason: FinishReason) -> None:
        """End a request here and in the core (which sends nothing more for it)."""
        if req.is_finished:
            return
        req.finish_reason = reason
        self.requests.pop(req.seq_id, None)
        self._send(AbortRequests(seq_ids=np.array([req.seq_id], np.int64), finish=finish_code(reason)))

    def fail_requests(self, message: str, tell_core: bool = True) -> int:
        """End every live request, running or waiting, with an error (the shutdown grace is over,
        or the core is gone): each stream gets an error event, each waiting client a 500."""
        live = list(self.requests.values())
        for req in live:
            self._push(req, "", [], FinishReason.ERROR, error=message)
        if live and tell_core and not self.core_failed:
            self._send(AbortRequests(seq_ids=np.array([r.seq_id for r in live], np.int64),
                                     finish=finish_code(FinishReason.ERROR)))
        return len(live)

    # -- outputs ------------------------------------------------------------------------------
    def _on_outputs(self, msg: EngineCoreOutputs) -> None:
        """Detokenize and stream one message's rows (stop strings end requests here)."""
        got_token: list[RequestState] = []
        now = time.monotonic()   # token times as the client can first see them (vLLM's frontend stamps)
        tokens, finish, stop_token = msg.token_ids.tolist(), msg.finish.tolist(), msg.stop_token.tolist()
        for i, seq_id in enumerate(msg.seq_ids.tolist()):
            req = self.requests.get(seq_id)
            if req is None:
                continue   # ended here already (aborted, a stop string): the core learns it
            try:
                self._apply_row(req, tokens[i], finish[i], stop_token[i], msg.details.get(i), now, got_token)
            except Exception as exc:  # noqa: BLE001 (this request fails loudly; the batch's others go on)
                log.exception("request %s: applying its output failed", req.request_id)
                if not req.is_finished:
                    self.abort(req, FinishReason.ERROR)
                    req.queue.put_nowait(RequestOutput("", [], True, FinishReason.ERROR.value,
                                                       error=f"internal error: {type(exc).__name__}: {exc}"))
        if msg.iteration:
            stats = IterationStats.from_dict(msg.iteration)
            for hook in self.iteration_hooks:
                hook(stats, got_token)

    def _apply_row(self, req: RequestState, token: int, finish: int, stop_token: bool, details: dict | None,
                   now: float, got_token: list[RequestState]) -> None:
        reason, entry, error = finish_reason(finish), None, None
        if details:
            entry, error = self._take_details(req, details)
        if token == NO_TOKEN:
            self._push(req, "", [], reason or FinishReason.ERROR, error=error)
            return
        req.output_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        text = req.detok.add(token, stop_token=stop_token)
        if reason is None and req.detok.stopped:
            reason = FinishReason.STOP
            self._send(AbortRequests(seq_ids=np.array([req.seq_id], np.int64), finish=finish_code(reason)))
        if reason is not None:
            text += req.detok.flush()
        else:
            got_token.append(req)
        self._push(req, text, [token], reason, [entry] if entry is not None else None)

    @staticmethod
    def _take_details(req: RequestState, details: dict) -> tuple[TokenLogprob | None, str | None]:
        if "scheduled" in details:
            req.scheduled_time = details["scheduled"]
        if "prompt_logprobs" in details:
            req.prompt_logprobs = [from_wire(e) for e in details["prompt_logprobs"]]
        entry = None
        if "logprob" in details:
            entry = from_wire(details["logprob"])
            req.cumulative_logprob = float(details["cumulative"])
        return entry, details.get("error")

    def _push(self, req: RequestState, text: str, tokens: list[int], reason: FinishReason | None,
              logprobs: list[TokenLogprob] | None = None, error: str | None = None) -> None:
        first, req.pushed = not req.pushed, True
        req.queue.put_nowait(RequestOutput(
            text=text, token_ids=tokens, finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids), error=error,
            logprobs=logprobs, cumulative_logprob=req.cumulative_logprob,
            prompt_logprobs=req.prompt_logprobs if first and req.params.prompt_logprobs is not None else None))
        if reason is not None:
            req.finish_reason = reason
            self.requests.pop(req.seq_id, None)
            for hook in self.finished_hooks:
                hook(req)
            if req.span is not None:
                record_phases(req, self.served_name)
