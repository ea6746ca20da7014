"""The engine core: scheduling, block managers, grammars and the worker links, in a process of its own.

One asyncio task runs the loop: schedule -> send the plan to the GPU worker -> take the sampled
tokens into the scheduler and the grammars -> send the rows to the API server (``EngineCoreOutputs``,
one message per iteration). Requests come from the API server as ``AddRequest`` and leave as
``AbortRequests`` (a client gone, a stop string matched); the loop is the single writer of the
scheduler's state (docs/design.md, "The engine core").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable

import zmq.asyncio

from neo_common.config import NeoConfig
from neo_common.engine_core_protocol import HEARTBEAT_S, NO_TOKEN, AddRequest, EngineStatus, IterationStats
from neo_common.handshake import check_cpu_attention_ready, check_gpu_worker_ready
from neo_common.link import ClientKeyCheck, LinkKeys, prepare_runtime_dir
from neo_common.protocol import GrammarBitmask, IterationResult, Message, Place, WorkerError, WorkerKind
from neo_gateway.block_manager import BlockManager
from neo_gateway.core_outputs import OutputBatch
from neo_gateway.core_status import engine_status
from neo_gateway.logprobs import prompt_entries, prompt_logprobs, sampled_logprobs, to_wire
from neo_gateway.param_error import ParamError
from neo_gateway.request_trace import iteration_trace
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.scheduler import Scheduler, SchedulerOutput
from neo_gateway.sequence import FinishReason, Sequence, SeqStatus
from neo_gateway.structured_output import StructuredOutputManager
from neo_gateway.tokenizer import TextTokenizer
from neo_gateway.worker_link import IterationFailed, RejectReason, WorkerDown, WorkerLink

log = logging.getLogger(__name__)


class EngineCore:
    """Owns every live request and the scheduler; talks to the GPU worker through ``link`` and,
    with offloading on, to the cpu_attention processes through ``cpu_links``; to the API server
    through ``emit`` (a message out) and the ``add``/``abort`` calls its messages become.

    - ``scheduler``: created when the worker first reports ready (its pool sizes decide the block
      managers, its cost tables the offload policy), recreated when a restarted worker reports
      ready again.
    - ``cpu_links``: empty in GPU-only mode, else one per tensor-parallel rank (each rank's CPU
      process serves that rank's KV heads). Every CPU process gets each iteration's
      CpuAttentionPlan before the GPU worker gets the IterationPlan; they answer only with errors.
    - ``requests``: seq_id -> live request (removed when finished or aborted); ``_announced``:
      those whose first output went out (it carries their scheduling time and prompt logprobs);
      ``_compiling``: those whose grammar is being compiled (not in the scheduler yet).
    - ``outputs``: rows gathered for the API server, sent once per iteration.
    - ``max_model_len``: context limit (config, else the model's).
    - ``structured``: compiles the requests' grammars (structured outputs) and gives each sequence
      its matcher, which ``_advance`` advances with every accepted token.
    """

    def __init__(self, config: NeoConfig, tokenizer: TextTokenizer, ctx: zmq.asyncio.Context,
                 served_name: str, emit: Callable[[Message], None]) -> None:
        self.config = config
        self.emit = emit
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
        self.requests: dict[int, Sequence] = {}
        self._announced: set[int] = set()
        self._compiling: set[int] = set()   # constrained requests waiting for their grammar
        self.outputs = OutputBatch()
        self.max_model_len = 0
        self.eos_token_ids: tuple[int, ...] = ()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._ready_seen = 0
        self._watch_task: asyncio.Task | None = None
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
        self._watch_task = asyncio.create_task(self._watch_status())

    async def stop(self) -> None:
        """Stop the loop, tell the workers to exit (Shutdown), close the links."""
        for task in (self._loop_task, self._watch_task):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
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

    # -- the API server's side --------------------------------------------------------------
    def status(self, request_id: int = 0) -> EngineStatus:
        return engine_status(self, request_id)

    async def _watch_status(self) -> None:
        """Tell the API server whenever readiness, limits or the workers change (it admits requests
        on what it last heard; link events come from several tasks, so they are polled here), and
        at least every ``HEARTBEAT_S``: a core it has not heard from in a while is wedged."""
        last, sent_key = 0.0, None
        while True:
            key = (self.ready, self.loop_alive, self.max_model_len,
                   tuple((link.alive, link.ready.pid if link.ready else 0) for link in self.links))
            now = time.monotonic()
            if key != sent_key or now - last >= HEARTBEAT_S:
                sent_key, last = key, now
                self.emit(self.status())
            await asyncio.sleep(0.02)

    def add(self, msg: AddRequest) -> None:
        """Queue a request; one that cannot be taken (no worker ever ready, invalid parameters) ends
        at once with an error row (the API server checked both: this is a race, or a bug). One that
        arrives while a worker restarts waits for it, as the requests queued before did."""
        if self.scheduler is None:
            self._fail_now(msg.seq_id, "the GPU worker is not ready")
            return
        try:
            params = SamplingParams.from_wire(msg.params)
        except (ParamError, TypeError, ValueError) as exc:
            self._fail_now(msg.seq_id, f"invalid sampling parameters: {exc}")
            return
        seq = Sequence(msg.seq_id, msg.request_id, msg.prompt_ids.tolist(), params, self.eos_token_ids,
                       self.max_model_len, arrival=msg.arrival)
        seq.traceparent = msg.traceparent or None
        self.requests[seq.seq_id] = seq
        if params.structured_outputs is None:
            self.scheduler.add(seq)
            self._wake.set()
        else:
            self._compiling.add(seq.seq_id)
            asyncio.ensure_future(self._add_when_compiled(seq))

    async def _add_when_compiled(self, seq: Sequence) -> None:
        """Queue a constrained request once its grammar is compiled (off the loop, on the
        manager's threads; each process has its own cache, so a new grammar is compiled by the API
        server, to validate it, and then here)."""
        try:
            await self.structured.prepare(seq.params.structured_outputs)
            if seq.seq_id in self._compiling:   # not aborted meanwhile
                seq.structured = self.structured.request_for(seq.params.structured_outputs)
        except Exception as exc:  # noqa: BLE001 (ParamError, or a bug: the request fails, loudly)
            if seq.seq_id in self._compiling:
                self._compiling.discard(seq.seq_id)
                self._forget(seq)
                self._fail_now(seq.seq_id, str(exc) if isinstance(exc, ParamError) else
                               f"internal error: {type(exc).__name__}: {exc}")
            return
        if seq.seq_id not in self._compiling:
            return
        self._compiling.discard(seq.seq_id)
        if self.scheduler is None:
            self._forget(seq)
            self._fail_now(seq.seq_id, "the GPU worker is not ready")
            return
        self.scheduler.add(seq)
        self._wake.set()

    def _fail_now(self, seq_id: int, message: str) -> None:
        self.outputs.fail(seq_id, message)
        self._flush()

    def abort(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.seq_id in self._compiling:   # never reached the scheduler
            self._compiling.discard(seq.seq_id)
        elif self.scheduler is not None and not seq.is_finished:
            self.scheduler.finish(seq, reason)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, seq.finish_reason or reason
        self._forget(seq)

    def abort_requests(self, seq_ids, reason: FinishReason) -> None:
        """The API server ended these requests (it sends nothing more for them, nor do we)."""
        for seq_id in seq_ids:
            seq = self.requests.get(int(seq_id))
            if seq is not None:
                self.abort(seq, reason)

    def forget_and_fail(self, seq_id: int, message: str) -> None:
        """A request whose intake failed part-way: out of the scheduler if it got there, and an
        error row to the API server (which would otherwise wait for it forever)."""
        seq = self.requests.get(seq_id)
        if seq is not None:
            try:
                self.abort(seq, FinishReason.ERROR)
            finally:
                self._forget(seq)
        self._fail_now(seq_id, message)

    def _forget(self, seq: Sequence) -> None:
        self.requests.pop(seq.seq_id, None)
        self._announced.discard(seq.seq_id)

    def _flush(self, iteration: IterationStats | None = None) -> None:
        if len(self.outputs) or iteration is not None:
            self.emit(self.outputs.take(iteration))

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
            except Exception:  # noqa: BLE001 (the loop must survive; _iterate failed the requests it held)
                log.exception("an iteration failed in the engine core")
            self._flush()

    async def _iterate(self, sched: Scheduler, output: SchedulerOutput, t_start: float) -> None:
        """Run ``output`` and, with async scheduling, the iterations scheduled ahead of it: each
        next one is sent before the current one's result is awaited, so the worker finds it queued
        and the GPU does not wait while this process applies results; an iteration not scheduled
        ahead is sent as soon as the current result is in the scheduler (``_send_next``). An
        iteration's wall time is then the cycle between consecutive results. A plan scheduled ahead with
        grammar-constrained rows gets its masks as soon as the current result has advanced the
        grammars, before anything else is sent (``SchedulerOutput.bitmask_deferred``)."""
        generation = self.link.generation
        sent: list[SchedulerOutput] = []  # sent, reply not read yet (at most two)
        masked: set[int] = set()          # deferred-mask plans whose masks were sent
        unsent: SchedulerOutput | None = output   # scheduled, not sent yet
        applying: SchedulerOutput | None = None   # its result is being applied, its rows not all emitted
        try:
            await self._send(sched, output, sent)
            unsent = None
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
                applying = sent.pop(0)
                updates = self._advance(current, result)
                try:
                    if sent and sent[0].bitmask_deferred:   # first: the device waits on them
                        await self._send_masks(sent[0], masked)
                    elif not sent:
                        await self._send_next(sched, sent)  # the device is idle: the rows can wait for it
                finally:   # the rows go out whatever became of the next send (a finished request's last one too)
                    self._emit(current, result, updates)
                applying = None
                sched.observe(current, result.forward_s - result.swap_s)
                now = time.perf_counter()
                self._flush(self._iteration_stats(current, result, now - t_start))
                t_start = now
        except WorkerDown as exc:
            self._fail_running(str(exc))
        except Exception as exc:
            message = f"internal error in the engine core: {type(exc).__name__}: {exc}"
            if applying is not None:   # requests it finished may not have had their last row
                self._fail_rows(applying, message, finished_too=True)
            for out in ([unsent] if unsent is not None else []) + sent:
                self._fail_rows(out, message)
            await self._discard_replies(sent, generation, masked)  # the next iteration must not read them
            raise

    async def _send_next(self, sched: Scheduler, sent: list[SchedulerOutput]) -> None:
        """Schedule and send the next iteration at once when nothing is queued on the worker (no
        plan was scheduled ahead), before this result's rows are built and sent: the device idles
        from its last result to the next plan, not through the streaming. Left to the loop when
        there is no work or a worker is down or was replaced (the loop waits for it and adopts it)."""
        if (self._ready_seen != self.link.generation or not all(link.alive for link in self.links)
                or not sched.has_work()):
            return
        output = sched.schedule()
        if not output.is_empty:
            await self._send(sched, output, sent)

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
        """What ``_advance`` took in, as rows for the API server (which detokenizes and streams)."""
        self._apply_prompt_logprobs(result)
        logprobs = {}
        if len(result.lp_seq_ids):
            sampled = dict(zip(result.seq_ids.tolist(), result.token_ids.tolist()))
            asked = {r.seq.seq_id: r.seq.params.logprobs for r in output.rows
                     if r.sample and r.seq.params.logprobs is not None}
            logprobs = sampled_logprobs(result, sampled, asked)
        for seq, token, scheduled_reason, reason in updates:
            if seq.seq_id not in self.requests:
                continue
            details: dict = {}
            if seq.seq_id not in self._announced:
                self._announced.add(seq.seq_id)
                details["scheduled"] = seq.scheduled_time
                if seq.params.prompt_logprobs is not None:
                    details["prompt_logprobs"] = [to_wire(e) for e in seq.prompt_logprobs]
            entry = logprobs.get(seq.seq_id)
            if entry is not None:
                seq.cumulative_logprob += entry.logprob
                details["logprob"], details["cumulative"] = to_wire(entry), seq.cumulative_logprob
            if seq.structured is not None and reason is FinishReason.ERROR:
                details["error"] = "the output left its grammar (structured outputs)"
                self.outputs.add(seq.seq_id, NO_TOKEN, reason, **details)
            else:
                self.outputs.add(seq.seq_id, token, reason, scheduled_reason is FinishReason.STOP, **details)
            if reason is not None:
                self._forget(seq)

    def _iteration_stats(self, output: SchedulerOutput, result: IterationResult, wall_s: float) -> IterationStats:
        stats = IterationStats(wall_s=wall_s, worker_s=result.total_s, launched_ahead=bool(result.launched_ahead),
                               num_tokens=sum(r.num_tokens for r in output.rows))
        decision, ready = output.decision, self.link.ready
        if decision is not None:
            stats.plan = "pipelined" if output.pipelined else "sequential"
            if ready is not None and ready.geometry is not None:
                stats.predicted_forward_s = decision.predicted_forward_s(ready.geometry.num_layers)
            stats.measured_forward_s = result.forward_s - result.swap_s
            if output.cpu_rows:
                stats.cpu_wait_s = result.cpu_wait_s
        return stats

    def _apply_prompt_logprobs(self, result: IterationResult) -> None:
        """Append the prompt logprobs of each row that asked: its positions from the first missing
        one on (``Sequence.prompt_logprob_span``), whose tokens are the prompt's next ones."""
        for seq_id, start, count in prompt_logprobs(result):
            seq = self.requests.get(seq_id)
            if seq is None:
                continue
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

    def _fail_rows(self, output: SchedulerOutput, message: str, finished_too: bool = False) -> None:
        """End the requests of a failed iteration, and those it moved between pools (their copies
        may not have happened, so their KV cannot be trusted). ``finished_too``: also those the
        scheduler finished but the API server has not heard of (their result was being applied)."""
        seqs = {r.seq.seq_id: r.seq for r in output.rows}
        seqs.update((s.seq_id, s) for s in output.swapped_out + output.swapped_in)
        for seq in seqs.values():
            if seq.seq_id in self.requests and (finished_too or seq.status is SeqStatus.RUNNING):
                self.abort(seq, FinishReason.ERROR)
                self.outputs.fail(seq.seq_id, message)

    def _fail_running(self, message: str, places: tuple[Place, ...] = (Place.GPU, Place.CPU)) -> None:
        """A worker is gone with the KV: requests that held KV there end with an error now."""
        if self.scheduler is None:
            return
        held = self.scheduler.running + self.scheduler.cpu_queue
        for seq in [s for s in held if s.place in places]:
            if seq.seq_id in self.requests:
                self.outputs.fail(seq.seq_id, message)
            self.abort(seq, FinishReason.ERROR)
        self._flush()

    def _on_worker_down(self, reason: str) -> None:
        self._fail_running(reason)
        self._tell_down()

    def _on_cpu_attention_down(self, reason: str) -> None:
        """CPU-resident requests cannot decode without the CPU process; GPU ones carry on."""
        self._fail_running(reason, (Place.CPU,))
        self._tell_down()

    def _tell_down(self) -> None:
        """A link lost its worker: the API server hears it now, not at the next poll, so it never
        admits requests (or answers /ready) on a status that still has the worker."""
        self.emit(self.status())

    def _drain_cpu_errors(self) -> None:
        """The CPU process reports failed jobs asynchronously; the GPU worker's reply already failed
        the iteration, so these are logged, not acted on twice."""
        for link in self.cpu_links:
            for msg in link.drain():
                if isinstance(msg, WorkerError):
                    log.error("%s: %s", link.name, msg.message)

    # -- shutdown --
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
