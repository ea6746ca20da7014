"""The gateway's engine: request intake, the iteration loop, and per-request output streams.

One asyncio task runs the loop: schedule -> send the plan to the GPU worker -> apply sampled tokens
-> detokenize, check stops, push deltas to each request's queue. HTTP handlers only add requests
and read their queues, so the loop is the single writer of scheduler state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
import zmq.asyncio

from opentelemetry import trace

from neo_common import tracing
from neo_common.config import NeoConfig
from neo_common.handshake import check_cpu_attention_ready, check_gpu_worker_ready
from neo_common.link import ClientKeyCheck, LinkKeys, prepare_runtime_dir
from neo_common.protocol import GrammarBitmask, IterationResult, Place, WorkerError, WorkerKind
from neo_gateway.block_manager import BlockManager
from neo_gateway.detokenizer import IncrementalDetokenizer
from neo_gateway.logprobs import TokenLogprob, prompt_entries, prompt_logprobs, sampled_logprobs
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.scheduler import Scheduler, SchedulerOutput
from neo_gateway.sequence import FinishReason, Sequence, SeqStatus
from neo_gateway.request_trace import iteration_trace, record_phases
from neo_gateway.structured_output import StructuredOutputManager
from neo_gateway.tokenizer import TextTokenizer
from neo_gateway.worker_link import IterationFailed, RejectReason, WorkerDown, WorkerLink

log = logging.getLogger(__name__)


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


@dataclasses.dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    queue: asyncio.Queue
    pushed: bool = False   # an output went out (the prompt logprobs go with the first)


class RequestStream:
    """Async iterator over one request's outputs; closing it before the end aborts the request."""

    def __init__(self, engine: "Engine", req: _Request) -> None:
        self.engine, self.req = engine, req

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.req.seq.is_finished and self.req.queue.empty():
            raise StopAsyncIteration
        return await self.req.queue.get()

    def abort(self) -> None:
        """Abort the request unless it has finished. Synchronous on purpose: it runs in ``finally``
        blocks of cancelled tasks (a client that hung up), where any ``await`` is cancelled again
        before it could run."""
        if not self.req.seq.is_finished:
            self.engine.abort(self.req.seq, FinishReason.ABORT)


class Engine:
    """Owns every live request and the scheduler; talks to the GPU worker through ``link`` and,
    with offloading on, to the cpu_attention processes through ``cpu_links``.

    - ``scheduler``: created when the worker first reports ready (its pool sizes decide the block
      managers, its cost tables the offload policy), recreated when a restarted worker reports
      ready again.
    - ``cpu_links``: empty in GPU-only mode, else one per tensor-parallel rank (each rank's CPU
      process serves that rank's KV heads). Every CPU process gets each iteration's
      CpuAttentionPlan before the GPU worker gets the IterationPlan; they answer only with errors.
    - ``requests``: seq_id -> live request (removed when finished).
    - ``max_model_len``: context limit (config, else the model's).
    - ``structured``: compiles the requests' grammars (structured outputs) and gives each sequence
      its matcher, which ``_advance`` advances with every accepted token.
    """

    def __init__(self, config: NeoConfig, tokenizer: TextTokenizer, ctx: zmq.asyncio.Context,
                 served_name: str = "") -> None:
        self.config = config
        self.served_name = served_name
        self.tokenizer = tokenizer
        prepare_runtime_dir(config.runtime_dir)   # the ipc sockets (and tcp keys) live there
        self._auth = None   # the ZAP handler of tcp links (_authenticate_tcp)
        keys = self._authenticate_tcp(ctx) if config.uses_tcp else None
        self.link = WorkerLink(ctx, config.worker_addr, "gpu_worker", WorkerKind.GPU_WORKER,
                               config.ipc.worker_timeout_s, lambda r: check_gpu_worker_ready(r, config), keys)
        self.link.on_down.append(self._on_worker_down)
        self.cpu_links: list[WorkerLink] = []
        if config.offload_enabled:
            world = config.device.tensor_parallel_size
            for rank in range(world):
                name = "cpu_attention" if world == 1 else f"cpu_attention[{rank}]"
                link = WorkerLink(ctx, config.for_rank(rank).cpu_attention_addr, name, WorkerKind.CPU_ATTENTION,
                                  config.ipc.worker_timeout_s, lambda r: check_cpu_attention_ready(r, config), keys)
                link.on_down.append(self._on_cpu_attention_down)
                self.cpu_links.append(link)
        self.scheduler: Scheduler | None = None
        self.requests: dict[int, _Request] = {}
        self.max_model_len = 0
        self.eos_token_ids: tuple[int, ...] = ()
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._ready_seen = 0
        self.finished_hooks: list = []  # callbacks(seq) when a request ends (metrics)
        self.iteration_hooks: list = []  # callbacks(output, result, wall_s) after each iteration (metrics)
        self.structured = StructuredOutputManager(tokenizer)

    def _authenticate_tcp(self, ctx: zmq.asyncio.Context) -> LinkKeys:
        """The replica's CurveZMQ keys, and a ZAP handler on ``ctx`` that admits only its workers'
        key (neo_common.link); a denied key is counted on the link whose ZAP domain it tried."""
        from zmq.auth.asyncio import AsyncioAuthenticator

        keys = LinkKeys.load_or_create(self.config.runtime_dir)
        self._auth = AsyncioAuthenticator(ctx)   # started by start(), in the event loop, before any bind

        def denied(domain: str) -> None:
            for link in self.links:
                if link.name == domain:
                    link.rejected[RejectReason.UNAUTHENTICATED] += 1
            log.warning("refused a tcp peer without this replica's link key (%s)", domain)

        self._key_check = ClientKeyCheck(keys, denied)
        return keys

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._auth is not None:
            self._auth.start()
            for link in self.links:   # ZAP looks providers up by domain: one per link name
                self._auth.configure_curve_callback(link.name, credentials_provider=self._key_check)
        for link in self.links:
            link.start()
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop, tell the workers to exit (Shutdown), close the links."""
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self.shutdown_workers("the gateway is stopping")
        for link in self.links:
            await link.close()
        if self._auth is not None:
            self._auth.stop()
        self.structured.close()

    @property
    def links(self) -> list[WorkerLink]:
        return [self.link, *self.cpu_links]

    @property
    def loop_alive(self) -> bool:
        """False once the iteration loop has ended (it only should at shutdown): /health reports it."""
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def ready(self) -> bool:
        return self.loop_alive and all(link.alive for link in self.links) and self.scheduler is not None

    def _adopt_worker(self) -> None:
        """(Re)build the scheduler for the worker that just reported ready."""
        ready = self.link.ready
        assert ready is not None
        limit = self.config.model.max_model_len
        self.max_model_len = min(limit, ready.max_model_len) if limit else ready.max_model_len
        self.eos_token_ids = self.tokenizer.eos_token_ids or tuple(ready.geometry.eos_token_ids)
        self.structured.bind_vocab(ready.geometry.vocab_size)
        gpu = BlockManager(ready.num_gpu_blocks, ready.block_size, Place.GPU, self.config.cache.enable_prefix_caching)
        cpu, costs = None, None
        if self.cpu_links and ready.num_cpu_blocks:
            cpu = BlockManager(ready.num_cpu_blocks, ready.block_size, Place.CPU)
            costs = ready.cost_tables   # parsed on decoding; the handshake check refused a Ready without them
        old = self.scheduler
        # everything besides the tokens that decides a block's KV salts the prefix-cache hashes
        salt = f"{self.served_name}|{ready.geometry.name}|{ready.dtype}|{ready.kv_dtype}|{ready.block_size}"
        self.scheduler = Scheduler(self.config.scheduler, gpu, cpu, costs, cache_salt=salt)
        log.info("scheduler: %d GPU blocks, %d CPU blocks, offload %s", gpu.num_blocks,
                 cpu.num_blocks if cpu else 0, self.scheduler.mode)
        if old is not None:  # requests that were only queued survive a worker restart
            for seq in old.waiting:
                self.scheduler.add(seq)
        self._ready_seen = self.link.generation

    # -- intake -------------------------------------------------------------------------------
    def check_capacity(self, num_tokens: int) -> str | None:
        """Why a request of this many tokens can never run here (None if it can)."""
        sched = self.scheduler
        if sched is not None and sched.gpu.blocks_for(num_tokens) > sched.gpu.num_blocks:
            return (f"the request needs {num_tokens} tokens of KV cache but the cache holds "
                    f"{sched.gpu.num_blocks * sched.gpu.block_size}")
        return None

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> "RequestStream":
        """Queue a request; raises at once when it cannot be taken, else returns its output stream."""
        if not self.ready:
            raise EngineUnavailable("the GPU worker is not ready")
        assert self.scheduler is not None
        # Capacity is the running slots plus the waiting queue: a burst into an idle replica queues
        # briefly before the loop admits it to free slots, and must not be refused meanwhile.
        sched, cfg = self.scheduler, self.config.scheduler
        if sched.num_running + sched.num_waiting >= cfg.max_num_seqs + cfg.max_waiting:
            raise EngineOverloaded(f"{sched.num_running} requests are running and {sched.num_waiting} waiting "
                                   f"(capacity {cfg.max_num_seqs} + {cfg.max_waiting})")
        seq = Sequence(next(self._ids), request_id, prompt_ids, params, self.eos_token_ids, self.max_model_len)
        if tracing.enabled():
            seq.span = trace.get_current_span()  # the request's server span (TracingMiddleware)
        if params.structured_outputs is not None:   # compiled already (api: StructuredOutputManager.prepare)
            seq.structured = self.structured.request_for(params.structured_outputs)
        req = _Request(seq, IncrementalDetokenizer.for_params(self.tokenizer, params), asyncio.Queue())
        self.requests[seq.seq_id] = req
        self.scheduler.add(seq)
        self._wake.set()
        return RequestStream(self, req)

    def abort(self, seq: Sequence, reason: FinishReason) -> None:
        if self.scheduler is not None and not seq.is_finished:
            self.scheduler.finish(seq, reason)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, seq.finish_reason or reason
        self.requests.pop(seq.seq_id, None)

    # -- the loop -----------------------------------------------------------------------------
    async def _loop(self) -> None:
        """Run iterations forever. A bug hit while building or applying one iteration fails the
        requests in it, never the loop: a dead loop would wedge every later request."""
        while True:
            for link in self.links:
                if not link.alive:
                    await link.ready_event.wait()
            if self.scheduler is None or self._ready_seen != self.link.generation:
                self._adopt_worker()
            sched = self.scheduler
            assert sched is not None
            if not sched.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            t_start = time.perf_counter()  # the iteration's wall time includes scheduling it
            output = sched.schedule()
            if output.is_empty:
                await asyncio.sleep(0.001)  # everything is waiting on blocks held by finishing requests
                continue
            try:
                await self._iterate(sched, output, t_start)
            except Exception as exc:  # noqa: BLE001 (the loop must survive; the requests in it may not)
                log.exception("iteration %d failed in the gateway", output.iteration_id)
                self._fail_rows(output, f"internal error: {type(exc).__name__}: {exc}")

    async def _iterate(self, sched: Scheduler, output: SchedulerOutput, t_start: float) -> None:
        """Run ``output`` and, with async scheduling, the iterations scheduled ahead of it: each
        next one is sent before the current one's result is awaited, so the worker finds it queued
        and the GPU does not wait while this process applies results and serves HTTP. A hook's
        wall time is then the cycle between consecutive results. A plan scheduled ahead with
        grammar-constrained rows gets its masks as soon as the current result has advanced the
        grammars, before anything else is sent (``SchedulerOutput.bitmask_deferred``)."""
        generation = self.link.generation
        sent: list[SchedulerOutput] = []  # sent, reply not read yet (at most two)
        masked: set[int] = set()          # deferred-mask plans whose masks were sent
        try:
            await self._send(sched, output, sent)
            while sent:
                current = sent[0]
                if self.config.scheduler.async_scheduling and len(sent) == 1:
                    ahead = sched.schedule_ahead(current)
                    if ahead is not None:
                        await self._send(sched, ahead, sent)
                try:
                    result = await self.link.reply(generation, current.iteration_id)
                    self._check_answers(current, result)
                except IterationFailed as exc:
                    self._iteration_failed(sent, str(exc))
                    sent.pop(0)
                    await self._discard_replies(sent, generation, masked)
                    return
                finally:
                    self._drain_cpu_errors()
                sent.pop(0)
                updates = self._advance(current, result)
                if sent and sent[0].bitmask_deferred:   # first: the device waits on them
                    await self._send_masks(sent[0], masked)
                self._emit(current, result, updates)
                sched.observe(current, result.forward_s - result.swap_s)
                now = time.perf_counter()
                for hook in self.iteration_hooks:
                    hook(current, result, now - t_start)
                t_start = now
        except WorkerDown as exc:
            self._fail_running(str(exc))
        except Exception:
            for out in sent:
                self._fail_rows(out, "internal error in the gateway")
            await self._discard_replies(sent, generation, masked)  # the next iteration must not read them
            raise

    async def _discard_replies(self, sent: list[SchedulerOutput], generation: int, masked: set[int]) -> None:
        """Read and drop the replies to ``sent`` (failed already). A plan whose masks were never
        sent gets all-ones masks first: the worker holds its sampling until they come."""
        while sent:
            out = sent.pop(0)
            if out.bitmask_deferred and out.iteration_id not in masked:
                with contextlib.suppress(WorkerDown):
                    await self._send_masks(out, masked, allow_all=True)
            with contextlib.suppress(IterationFailed, WorkerDown):
                await self.link.reply(generation, out.iteration_id)

    async def _send_masks(self, output: SchedulerOutput, masked: set[int], allow_all: bool = False) -> None:
        masks, index = output.grammar_bitmask(allow_all)
        await self.link.send(GrammarBitmask(iteration_id=output.iteration_id, bitmask=masks, bitmask_index=index))
        masked.add(output.iteration_id)

    @staticmethod
    def _check_answers(output: SchedulerOutput, result) -> None:
        """A reply must be the IterationResult of this plan, with a token for exactly its sampled rows;
        anything else fails this iteration alone, loudly (never a token given to the wrong request)."""
        if not isinstance(result, IterationResult) or result.iteration_id != output.iteration_id:
            raise IterationFailed(f"the GPU worker answered iteration {output.iteration_id} with "
                                  f"{type(result).__name__} {getattr(result, 'iteration_id', '?')}")
        wanted = sorted(r.seq.seq_id for r in output.rows if r.sample)
        if sorted(result.seq_ids.tolist()) != wanted:
            raise IterationFailed(f"the GPU worker's reply to iteration {output.iteration_id} samples other "
                                  "requests than the plan")

    def _iteration_failed(self, sent: list[SchedulerOutput], message: str) -> None:
        """The worker could not run ``sent[0]``; plans sent behind it feed on tokens never sampled,
        so they fail with it. When the failed plan had CPU rows (a CPU attention process died or
        failed mid-iteration), only the CPU-resident requests are lost: the GPU-resident ones are
        preempted by recompute (their KV is rebuilt from their tokens) and carry on."""
        cpu_caused = bool(sent[0].cpu_rows) and self.scheduler is not None
        for out in sent:
            if cpu_caused:
                self._recompute_gpu_rows(out)
            self._fail_rows(out, message)

    def _recompute_gpu_rows(self, output: SchedulerOutput) -> None:
        assert self.scheduler is not None
        seqs = {r.seq.seq_id: r.seq for r in output.rows}
        seqs.update((s.seq_id, s) for s in output.swapped_in)
        for seq in seqs.values():
            if seq.place is Place.GPU and self.scheduler.recompute(seq):
                log.warning("request %s is recomputed after its iteration failed", seq.request_id)

    async def _send(self, sched: Scheduler, output: SchedulerOutput, sent: list[SchedulerOutput]) -> None:
        plan = output.to_plan(sched.gpu, sched.cpu)
        if tracing.enabled():
            plan.trace = iteration_trace(output)
        cpu_plan = output.to_cpu_plan(sched.cpu) if sched.cpu is not None else None
        if cpu_plan is not None:
            assert self.cpu_links
            cpu_plan.trace = plan.trace
            for link in self.cpu_links:
                await link.send(cpu_plan)
        await self.link.send(plan, awaits_reply=True)
        sent.append(output)

    def _advance(self, output: SchedulerOutput, result: IterationResult) -> list[tuple]:
        """The iteration's tokens into the scheduler and the grammars, before anything is
        detokenized or streamed: the next plan's deferred masks wait on the grammars alone.
        Per row: (sequence, token, the scheduler's finish reason, the reason after its grammar)."""
        assert self.scheduler is not None
        sampled = dict(zip(result.seq_ids.tolist(), result.token_ids.tolist()))
        updates = []
        for seq, token, reason in self.scheduler.update(output, sampled):
            final = reason
            if seq.structured is not None and seq.seq_id in self.requests:
                final = self._advance_grammar(seq, token, reason)
            updates.append((seq, token, reason, final))
        return updates

    def _emit(self, output: SchedulerOutput, result: IterationResult, updates: list[tuple]) -> None:
        """Detokenize and stream what ``_advance`` took in (stop strings end requests here)."""
        assert self.scheduler is not None
        self._apply_prompt_logprobs(result)
        logprobs = {}
        if len(result.lp_seq_ids):
            sampled = dict(zip(result.seq_ids.tolist(), result.token_ids.tolist()))
            asked = {r.seq.seq_id: r.seq.params.logprobs for r in output.rows
                     if r.sample and r.seq.params.logprobs is not None}
            logprobs = sampled_logprobs(result, sampled, asked)
        for seq, token, scheduled_reason, reason in updates:
            req = self.requests.get(seq.seq_id)
            if req is None:
                continue
            entry = logprobs.get(seq.seq_id)
            if entry is not None:
                seq.logprobs.append(entry)
                seq.cumulative_logprob += entry.logprob
            text = req.detok.add(token, stop_token=scheduled_reason is FinishReason.STOP)
            if seq.structured is not None and reason is FinishReason.ERROR:
                self._push(req, "", [], reason, error="the output left its grammar (structured outputs)")
                continue
            if reason is None and req.detok.stopped:
                reason = FinishReason.STOP
                self.scheduler.finish(seq, reason)
            if reason is not None:
                text += req.detok.flush()
            self._push(req, text, [token], reason, [entry] if entry is not None else None)

    def _apply_prompt_logprobs(self, result: IterationResult) -> None:
        """Append the prompt logprobs of each row that asked: its positions from the first missing
        one on (``Sequence.prompt_logprob_span``), whose tokens are the prompt's next ones."""
        for seq_id, start, count in prompt_logprobs(result):
            req = self.requests.get(seq_id)
            if req is None:
                continue
            seq = req.seq
            have = len(seq.prompt_logprobs)
            tokens = seq.prompt_ids[have + 1:have + 1 + count]
            seq.prompt_logprobs.extend(prompt_entries(result, start, tokens, seq.params.prompt_logprobs or 0))

    def _advance_grammar(self, seq: Sequence, token: int,
                         reason: FinishReason | None) -> FinishReason | None:
        """Feed an accepted token to the request's grammar. A grammar that is complete and cannot
        grow ends the request (stop, also on its last allowed token); a token the grammar rejects
        (its mask was not applied) fails the request loudly rather than returning invalid output."""
        assert self.scheduler is not None and seq.structured is not None
        if not seq.structured.accept(token):
            log.error("request %s: the grammar rejected token %d: %s", seq.request_id, token, seq.structured.error)
            if reason is None:
                self.scheduler.finish(seq, FinishReason.ERROR)
            seq.finish_reason = FinishReason.ERROR
            return FinishReason.ERROR
        if seq.structured.terminated and reason in (None, FinishReason.LENGTH):
            if reason is None:
                self.scheduler.finish(seq, FinishReason.STOP)
            seq.finish_reason = FinishReason.STOP
            return FinishReason.STOP
        return reason

    def _push(self, req: _Request, text: str, tokens: list[int], reason: FinishReason | None,
              logprobs: list[TokenLogprob] | None = None, error: str | None = None) -> None:
        seq = req.seq
        first, req.pushed = not req.pushed, True
        req.queue.put_nowait(RequestOutput(
            text=text, token_ids=tokens, finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids), error=error,
            logprobs=logprobs, cumulative_logprob=seq.cumulative_logprob,
            prompt_logprobs=seq.prompt_logprobs if first and seq.params.prompt_logprobs is not None else None))
        if reason is not None:
            self.requests.pop(seq.seq_id, None)
            for hook in self.finished_hooks:
                hook(seq)
            if seq.span is not None:
                record_phases(seq, self.served_name)

    def _fail_rows(self, output: SchedulerOutput, message: str) -> None:
        """End the requests of a failed iteration, and those it moved between pools (their copies
        may not have happened, so their KV cannot be trusted)."""
        seqs = {r.seq.seq_id: r.seq for r in output.rows}
        seqs.update((s.seq_id, s) for s in output.swapped_out + output.swapped_in)
        for seq in seqs.values():
            req = self.requests.get(seq.seq_id)
            if req is not None and seq.status is SeqStatus.RUNNING:   # not finished, nor requeued to recompute
                self.abort(seq, FinishReason.ERROR)
                self._push(req, "", [], FinishReason.ERROR, error=message)

    def _fail_running(self, message: str, places: tuple[Place, ...] = (Place.GPU, Place.CPU)) -> None:
        """A worker is gone with the KV: requests that held KV there end with an error now."""
        if self.scheduler is None:
            return
        held = self.scheduler.running + self.scheduler.cpu_queue
        for seq in [s for s in held if s.place in places]:
            req = self.requests.get(seq.seq_id)
            self.abort(seq, FinishReason.ERROR)
            if req is not None:
                self._push(req, "", [], FinishReason.ERROR, error=message)

    def _on_worker_down(self, reason: str) -> None:
        self._fail_running(reason)

    def _on_cpu_attention_down(self, reason: str) -> None:
        """CPU-resident requests cannot decode without the CPU process; GPU ones carry on."""
        self._fail_running(reason, (Place.CPU,))

    def _drain_cpu_errors(self) -> None:
        """The CPU process reports failed jobs asynchronously; the GPU worker's reply already failed
        the iteration, so these are logged, not acted on twice."""
        for link in self.cpu_links:
            for msg in link.drain():
                if isinstance(msg, WorkerError):
                    log.error("%s: %s", link.name, msg.message)

    # -- drain --
    def fail_requests(self, message: str) -> int:
        """End every live request, running or waiting, with an error (the shutdown grace is over):
        each stream gets an error event, each waiting client a 500. Returns how many."""
        live = list(self.requests.values())
        for req in live:
            self.abort(req.seq, FinishReason.ERROR)
            self._push(req, "", [], FinishReason.ERROR, error=message)
        return len(live)

    async def shutdown_workers(self, reason: str, timeout_s: float = 5.0) -> None:
        """Say Shutdown to every registered worker and wait (at most ``timeout_s``) until each has
        left: a worker stops serving on it, also one that got SIGTERM and waits for the drain. The
        disconnect that follows is the expected end, not a failure, so the link is retired first
        (a link with no WorkerReady reports no disconnect as an error and fails no request)."""
        from neo_common.protocol import Shutdown

        told = []
        for link in self.links:
            if not link.alive:
                continue
            with contextlib.suppress(WorkerDown):
                await link.send(Shutdown(reason=reason))
                told.append(link)
            link.retire()
        deadline = time.monotonic() + timeout_s
        while any(link.connected for link in told) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for link in told:
            if link.connected:
                log.warning("%s did not leave within %.0f s of Shutdown", link.name, timeout_s)
