"""Continuous batching with chunked prefill, and the NEO offload policy when a host pool exists.

Each ``schedule()`` call forms one iteration:

1. GPU-resident running requests, oldest first: a decode token each, or the next chunk of an
   unfinished prompt. When the GPU pool cannot grow one, the newest GPU request leaves: with a host
   pool it is *swapped out* (its blocks copied to the CPU pool; it keeps decoding there, at the
   front of the CPU queue), otherwise, or while it is still prefilling, it is *preempted by
   recompute* (blocks dropped, back to the front of the waiting queue, prefilled again later).
   Recompute is the GPU-only choice because without a host pool there is nowhere to swap to, and for
   the prompt lengths one GPU serves re-prefilling costs less than two PCIe trips.
2. With no swap-out this iteration, CPU-resident requests come back (*swap in*, oldest first) while
   GPU use, with their blocks, stays at or below ``swap_in_threshold``; the band up to 100% is the hysteresis.
3. Waiting requests are admitted FCFS under the token and sequence budgets and placed by
   ``Scheduler._place``: GPU first; once one goes to the CPU, the rest of the round follows (a
   request goes to the CPU only where ``offload_policy.decide`` would decode it there: ``_cpu_pays``).
   A CPU-bound prompt is prefilled on the GPU in one chunk (its KV streams to the host pool
   layer by layer), so it must fit the iteration's remaining token budget.
4. ``offload_policy.decide`` picks the sequential or the pipelined plan and which CPU-resident
   decodes run in which sub-batch; the others wait for a later iteration.

The scheduler owns both block managers' contents; workers only read the block tables it sends.
"""

from __future__ import annotations

import bisect
import collections
import logging
import time

from neo_common.config import SchedulerConfig
from neo_common.enums import OffloadMode
from neo_common.protocol import Place
from neo_gateway.block_manager import BlockManager
from neo_common.cost_model import CostTables
from neo_gateway.calibration import PipelineCalibration
from neo_gateway.host_tier import HostTier
from neo_gateway.offload_policy import WAIT, BatchCandidate, OffloadDecision, choose_swap_in, decide
from neo_gateway import prefix_cost
from neo_gateway.prefix_hash import PrefixHasher
from neo_gateway.schedule_output import ScheduledSeq, SchedulerOutput
from neo_gateway.sequence import FinishReason, Sequence, SeqStatus

log = logging.getLogger(__name__)

__all__ = ["Scheduler", "ScheduledSeq", "SchedulerOutput"]


class Scheduler:
    """Decides every iteration which requests run, where, and how many tokens each feeds.

    - ``waiting``: FCFS queue of requests without KV (new, or preempted by recompute).
    - ``running``: GPU-resident requests (KV in ``gpu``), in admission order (oldest first).
    - ``cpu_queue``: CPU-resident requests (KV in ``cpu``), in CPU queue order: swapped-out requests
      enter at the front, CPU-bound admissions at the back; swap-in takes from the front.
    - ``gpu``/``cpu``: the two pools' block managers (``cpu`` is None in GPU-only mode).
    - ``costs``: the machine's cost tables (the policy plans with them; None in GPU-only mode).
    - ``mode``: ``off`` (GPU only), ``auto`` (NEO) or ``full`` (every decode on the CPU).
    - ``iteration``: id of the last scheduled iteration; ``num_preemptions``/``num_swapped_out``/
      ``num_swapped_in``: totals since start.
    - ``calibration``: the pipelined plan's measured extra cost (``observe`` feeds it), which every
      decision, and so the admission and swap gates, plans with.
    - ``hasher``: prefix-cache hashes of the requests' blocks (None when ``gpu`` does not cache):
      admissions to the GPU start after their cached full blocks (docs/design.md, "Prefix caching").
    - ``host``: the cache's host tier (None without prefix caching, a host pool or its budget):
      GPU blocks evicted are demoted to the host pool, prompts found there are swapped in or, placed
      on the CPU, decode against the host blocks directly (``prefix_cost`` decides).
    """

    def __init__(self, config: SchedulerConfig, gpu_blocks: BlockManager, cpu_blocks: BlockManager | None = None,
                 costs: CostTables | None = None, cache_salt: str = "") -> None:
        self.config = config
        self.gpu = gpu_blocks
        self.cpu = cpu_blocks
        self.costs = costs
        offload = cpu_blocks is not None and costs is not None
        self.mode = OffloadMode(config.offload_mode) if offload else OffloadMode.OFF
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.cpu_queue: list[Sequence] = []
        self.iteration = 0
        self.num_preemptions = 0
        self.num_swapped_out = 0
        self.num_swapped_in = 0
        self.calibration = PipelineCalibration(config.calibrate_pipeline)
        self.hasher = PrefixHasher(gpu_blocks.block_size, cache_salt) if gpu_blocks.caching else None
        budget = int(config.host_prefix_cache_fraction * cpu_blocks.num_blocks) if cpu_blocks is not None else 0
        lookahead = 2 * gpu_blocks.blocks_for(config.max_num_batched_tokens)   # two iterations' allocations
        self.host = (HostTier(gpu_blocks, cpu_blocks, budget, prefix_cost.kv_block_bytes(costs) if costs else 0,
                              lookahead) if self.hasher is not None and budget > 0 else None)
        self._hit: list[tuple[Place, int]] = []         # the admission under way: its cached prefix

    def observe(self, output: SchedulerOutput, forward_s: float) -> None:
        """What the worker measured for ``output``'s forward (seconds, swaps excluded)."""
        if self.costs is not None:
            self.calibration.observe(output.decision, forward_s, int(dict(self.costs.key.shapes)["num_layers"]))

    def _decide(self, candidate: BatchCandidate) -> OffloadDecision:
        return decide(candidate, self.costs, self.mode, self.calibration.overhead_s)

    # -- queue management ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a request wherever it is and return its blocks in both pools at once."""
        if seq.status is SeqStatus.RUNNING:
            (self.cpu_queue if seq.place is Place.CPU else self.running).remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.cpu_queue)

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.cpu_queue)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def offloading(self) -> bool:
        return self.mode.offloads

    # -- the per-iteration decision -----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.iteration += 1
        out = SchedulerOutput(self.iteration, [], [])
        if self.mode is OffloadMode.FULL:  # every decode on the CPU: prompts prefilled on the GPU leave it
            for seq in [s for s in reversed(self.running) if s.num_pending == 1]:
                self._swap_out(seq, out)
        budget = self._schedule_gpu_running(out, self.config.max_num_batched_tokens)
        if self.offloading and not out.swapped_out and self.mode is not OffloadMode.FULL:
            budget -= self._swap_in(out)
        # decodes, and prompts decoding against host-cached blocks (fed a token per iteration)
        cpu_decodes = [s for s in self.cpu_queue if s.num_computed] if self.offloading else []
        slots = self.config.max_num_seqs - len(out.rows) - len(cpu_decodes)
        direct: list[Sequence] = []
        budget = self._admit(out, budget - len(cpu_decodes), slots, direct)
        cpu_decodes += direct
        if cpu_decodes:
            self._place_cpu_decodes(out, cpu_decodes, budget + len(cpu_decodes))
        elif self.offloading:
            out.decision = self._decide(self._candidate(out.rows, []))
        if self.host is not None:
            self.host.flush(out)
        return out

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The next iteration while ``prev`` still runs (async scheduling): every request of
        ``prev`` decodes the token ``prev`` samples for it, a placeholder the worker fills from its
        own last sample. Only for steady decoding on the GPU (nothing waiting, no request moving
        between pools, every row of ``prev`` sampling; the prefix cache's demotions and promotions
        may ride either plan: the worker orders every plan's copies before the next plan's work);
        None otherwise, or when blocks run short: the caller then waits for ``prev`` and schedules
        normally. A request that ends on ``prev``'s token by
        length is left out; one that ends by a stop token runs one wasted row, discarded by
        ``update`` (its blocks are reused only by later iterations, which the worker runs after).
        A request with a grammar (structured outputs) is scheduled ahead too: its mask needs the
        token ``prev`` samples, so the plan says its masks follow (``bitmask_deferred``) and the
        engine sends them once ``prev``'s tokens advanced the grammars, while the GPU runs this
        plan's forward."""
        if (self.waiting or self.cpu_queue or prev.preempted or prev.swapped_out or prev.swapped_in
                or prev.pipelined or not all(r.sample and r.seq.place is Place.GPU for r in prev.rows)):
            return None
        ahead = []
        for r in prev.rows:
            seq, pos = r.seq, r.start + r.num_tokens  # where prev's sampled token goes
            if seq.status is not SeqStatus.RUNNING:
                continue
            if len(seq.output_ids) + 1 >= seq.params.max_tokens or pos + 1 >= seq.max_model_len:
                continue  # prev's token is its last
            ahead.append((seq, pos))
        missing = sum(self.gpu.num_missing(seq.seq_id, pos + 1) for seq, pos in ahead)
        if not ahead or missing > self.gpu.num_free:
            return None
        self.iteration += 1
        out = SchedulerOutput(self.iteration, [], [])
        for seq, pos in ahead:
            self.gpu.allocate(seq.seq_id, pos + 1)
            out.rows.append(ScheduledSeq(seq, pos, 1, True, placeholder=True))
        if self.offloading:
            out.decision = self._decide(self._candidate(out.rows, []))
        if self.host is not None:
            self.host.flush(out)
        return out

    def _schedule_gpu_running(self, out: SchedulerOutput, budget: int) -> int:
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or seq.place is not Place.GPU:
                continue  # left the GPU earlier in this loop
            if budget == 0:
                break
            n = min(seq.num_pending, budget)
            while not self.gpu.can_allocate(seq.seq_id, seq.num_computed + n):
                victim = self.running[-1]
                self._evict(victim, out)
                if victim is seq:
                    break
            if seq.place is not Place.GPU or seq.status is not SeqStatus.RUNNING:
                continue
            self.gpu.allocate(seq.seq_id, seq.num_computed + n)
            out.rows.append(ScheduledSeq(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens))
            budget -= n
        return budget

    def _evict(self, victim: Sequence, out: SchedulerOutput) -> None:
        """Make GPU room: swap the victim to the CPU pool if it is decoding, fits there, and the
        policy would decode it there; else recompute it later (as GPU-only mode does). A request
        swapped to a host the policy never runs it on holds its place in the batch while serving
        nobody: waiting, it gets the GPU's next free blocks instead (the admission gate's reason)."""
        if not (self.offloading and self._cpu_pays(victim, front=True) and self._swap_out(victim, out)):
            self._preempt(victim)
            out.preempted.append(victim)

    def _swap_out(self, victim: Sequence, out: SchedulerOutput) -> bool:
        """Move a decoding GPU request's KV to the front of the CPU queue; False if it cannot go."""
        fits = self.cpu is not None and self.cpu.can_allocate(victim.seq_id, victim.num_computed + 1)
        if self.offloading and victim.num_pending == 1 and fits:
            self.running.remove(victim)
            src = self.gpu.table(victim.seq_id)[:self.gpu.blocks_for(victim.num_computed)]
            dst = self.cpu.allocate(victim.seq_id, victim.num_computed)
            out.swap_out_pairs.append((list(src), list(dst)))
            self.gpu.free(victim.seq_id)
            victim.place, victim.num_registered_blocks = Place.CPU, 0
            self.cpu_queue.insert(0, victim)
            out.swapped_out.append(victim)
            self.num_swapped_out += 1
            log.debug("swapped out seq %d (%d blocks)", victim.seq_id, len(dst))
            return True
        return False

    def _swap_in(self, out: SchedulerOutput) -> int:
        """Bring CPU requests back oldest first while GPU use stays under the threshold; each then
        decodes on the GPU this iteration. Returns how many came back (a token of budget each)."""
        queue = [(s.seq_id, self.gpu.blocks_for(s.num_computed + 1)) for s in self.cpu_queue if s.num_pending == 1]
        chosen = set(choose_swap_in(queue, self.gpu.num_blocks - self.gpu.num_free, self.gpu.num_blocks,
                                    self.config.swap_in_threshold))
        for seq in [s for s in self.cpu_queue if s.seq_id in chosen]:
            src = self.cpu.table(seq.seq_id)[:self.cpu.blocks_for(seq.num_computed)]
            dst = self.gpu.allocate(seq.seq_id, seq.num_computed + 1)[:len(src)]
            out.swap_in_pairs.append((list(src), list(dst)))
            if self.host is not None:
                self.cpu.park(seq.seq_id)   # its blocks must not receive a demotion of this iteration
            else:
                self.cpu.free(seq.seq_id)
            self.cpu_queue.remove(seq)
            seq.place, seq.num_registered_blocks = Place.GPU, 0
            bisect.insort(self.running, seq, key=lambda s: s.seq_id)  # back in admission order
            out.swapped_in.append(seq)
            self.num_swapped_in += 1
            out.rows.append(ScheduledSeq(seq, seq.num_computed, 1, True))
        return len(out.swapped_in)

    def _admit(self, out: SchedulerOutput, budget: int, slots: int, direct: list[Sequence]) -> int:
        """Admit waiting requests FCFS; those that decode against host-cached blocks at once (CPU
        direct) join ``direct`` instead of running a prefill row."""
        to_cpu_round = False
        while self.waiting and budget > 0 and slots > 0 and not out.preempted:
            seq = self.waiting[0]
            hit = self._share_cached_prefix(seq)
            n = min(seq.num_pending, budget)
            place = Place.GPU
            if self.offloading:
                place = self._place(seq, n, to_cpu_round)
                if hit and place is not Place.GPU:   # a CPU-bound prompt is prefilled whole, from its start
                    self._unshare(seq)
                    n = min(seq.num_pending, budget)
                    place = self._place(seq, n, to_cpu_round)
                if place is None:
                    self._unshare(seq)
                    break
                to_cpu_round = place is Place.CPU
            elif not self.gpu.can_allocate(seq.seq_id, seq.num_computed + n):
                self._unshare(seq)
                break
            self.waiting.popleft()
            seq.status, seq.place = SeqStatus.RUNNING, place
            if seq.scheduled_time is None:
                seq.scheduled_time = time.monotonic()
            if place is Place.GPU:
                self.gpu.allocate(seq.seq_id, seq.num_computed + n)
                self.running.append(seq)
                self._promote(out, seq)
            else:
                self._take_host_prefix(seq)
                self.cpu.allocate(seq.seq_id, seq.num_tokens)
                self.cpu_queue.append(seq)
            self._count_lookup(seq)   # once per admission, not per attempt that waited
            if seq.num_computed and place is Place.CPU:
                direct.append(seq)    # its first row is a CPU step, placed with the other CPU decodes
                budget -= 1
                slots -= 1
                continue
            out.rows.append(ScheduledSeq(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens))
            budget -= n
            slots -= 1
        return budget

    def _share_cached_prefix(self, seq: Sequence) -> bool:
        """Give a new (or recomputed) request the GPU blocks that already hold its prompt's leading
        full blocks, and fresh GPU blocks for those the host tier holds when copying them pays
        (``_promote`` copies them once it is placed on the GPU); its prefill then starts after
        them. True if any were found."""
        self._hit = []
        if self.hasher is None or seq.num_computed or seq.seq_id in self.gpu.tables or seq.needs_prompt_logprobs:
            return False   # (prompt logprobs need every prompt position computed)
        hashes = self.hasher.hashes(seq, self.hasher.cacheable_prefix_blocks(seq))
        hit = self.host.lookup(hashes) if self.host is not None else [(Place.GPU, b) for b in self.gpu.cached_prefix(hashes)]
        first_host = next((i for i, (p, _) in enumerate(hit) if p is not Place.GPU), len(hit))
        if first_host < len(hit):
            n_host = sum(p is not Place.GPU for p, _ in hit)
            room = self.gpu.num_free - sum(b in self.gpu.evictable for p, b in hit if p is Place.GPU)
            if n_host > room or not prefix_cost.swap_in_pays(self.costs, first_host, len(hit), n_host,
                                                             seq.num_tokens, self.gpu.block_size):
                hit = hit[:first_host]   # recomputing them costs less than copying them
        self._hit = hit
        if not hit:
            return False
        self.gpu.share(seq.seq_id, [b if p is Place.GPU else None for p, b in hit])
        seq.num_computed = len(hit) * self.gpu.block_size
        seq.num_registered_blocks = first_host   # the copies are registered once they have run
        return True

    def _unshare(self, seq: Sequence) -> None:
        """Undo ``_share_cached_prefix`` for a request that stays waiting or goes to the CPU."""
        self._hit = []
        if seq.status is SeqStatus.WAITING and seq.seq_id in self.gpu.tables:
            self.gpu.free(seq.seq_id)
            seq.num_computed = seq.num_registered_blocks = 0

    def _promote(self, out: SchedulerOutput, seq: Sequence) -> None:
        """Copy the host-tier blocks of a GPU admission's prefix into the GPU blocks it got for them."""
        table = self.gpu.table(seq.seq_id)
        pairs = [(b, table[i]) for i, (p, b) in enumerate(self._hit) if p is Place.CPU]
        if pairs:
            self.host.promote(out, [h for h, _ in pairs], [g for _, g in pairs])

    def _take_host_prefix(self, seq: Sequence) -> None:
        """A CPU admission decodes against the host-tier blocks of its prefix, no copy, when that
        pays (``prefix_cost.cpu_direct_pays``); its other prompt tokens are then fed one per
        iteration as CPU rows. Else it is prefilled whole, as without the host tier."""
        self._hit = []
        if self.host is None or seq.num_computed or seq.needs_prompt_logprobs:
            return
        blocks = self.host.host_prefix(self.hasher.hashes(seq, self.hasher.cacheable_prefix_blocks(seq)))
        tail = seq.num_tokens - len(blocks) * self.cpu.block_size
        if not blocks or not prefix_cost.cpu_direct_pays(self.costs, seq.num_tokens, tail, self._step_s(seq),
                                                         self.num_running):
            return
        self.cpu.share(seq.seq_id, blocks)
        self._hit = [(Place.CPU, b) for b in blocks]
        seq.num_computed = len(blocks) * self.cpu.block_size
        seq.num_registered_blocks = len(blocks)

    def _step_s(self, seq: Sequence) -> float:
        """Predicted forward time of an iteration of the running requests plus ``seq`` on the CPU."""
        if self.costs is None:
            return 0.0
        candidate = BatchCandidate(
            gpu_decode_lens=[s.num_tokens + 1 for s in self.running if s.place is Place.GPU],
            cpu_decode_lens=[s.num_tokens + 1 for s in self.cpu_queue if s is not seq] + [seq.num_tokens])
        return self._decide(candidate).predicted_forward_s(prefix_cost.num_layers(self.costs))

    def _count_lookup(self, seq: Sequence) -> None:
        if self.hasher is None:
            return
        queried = self.hasher.cacheable_prefix_blocks(seq)
        self.gpu.count_lookup(queried, sum(p is Place.GPU for p, _ in self._hit))
        if self.host is not None:
            self.cpu.count_lookup(queried, sum(p is Place.CPU for p, _ in self._hit))
        self._hit = []

    def _register_computed(self, seq: Sequence) -> None:
        """Offer the request's newly computed full blocks to later prompts (GPU blocks, and host
        blocks when the host pool is a cache tier)."""
        pool = self.gpu if seq.place is Place.GPU else self.cpu
        full = seq.num_computed // pool.block_size
        if self.hasher is not None and pool.caching and full > seq.num_registered_blocks:
            pool.register(seq.seq_id, self.hasher.hashes(seq, full), seq.num_registered_blocks)
            seq.num_registered_blocks = full

    def _place(self, seq: Sequence, n: int, to_cpu_round: bool) -> Place | None:
        """Where an admission's KV goes (None: it waits, FCFS). GPU while the chunk fits, unless an
        earlier request of this round went to the CPU; then the CPU if the whole prompt (plus its
        first generated token) fits there and the policy would decode it there (a request parked
        on the CPU that the policy never runs serves nobody: waiting, it gets the GPU's next free
        blocks instead). A prompt that cannot be prefilled whole this iteration cannot go to the
        CPU: later chunks of a CPU-bound prompt would need its earlier KV on the GPU. ``full``
        sends every whole prompt to the CPU; longer ones prefill on the GPU and are swapped out
        once they decode."""
        whole = n == seq.num_pending
        gpu_ok = self.gpu.can_allocate(seq.seq_id, seq.num_computed + n)

        def cpu_ok() -> bool:
            # asked only where the answer matters: the policy's look at the round costs a gateway
            # ~0.1-0.4 ms per admission, and an iteration runs in ~10 ms
            return whole and self.cpu.can_allocate(seq.seq_id, seq.num_tokens + 1) and self._cpu_pays(seq)

        if self.mode is OffloadMode.FULL or to_cpu_round:
            if cpu_ok():
                return Place.CPU
            return Place.GPU if gpu_ok and not whole and not to_cpu_round else None
        if gpu_ok:
            return Place.GPU
        return Place.CPU if cpu_ok() else None

    def _cpu_pays(self, seq: Sequence, front: bool = False) -> bool:
        """Would the policy decode ``seq`` on the CPU once the requests admitted so far decode (the
        other GPU-resident ones on the GPU, the CPU-resident ones on the CPU) and ``seq`` joins the
        CPU queue, at its back (an admission) or ``front`` (a swap-out victim)? The waiting requests
        that would follow it there (the rest of the round, as far as the host pool holds them)
        count too: one CPU row alone rarely pays for a second pass over the weights, a batch of them
        does, and it is the batch that the round sends. Always in ``full`` mode."""
        if self.mode is OffloadMode.FULL:
            return True
        follow, free = [], self.cpu.num_free - self.cpu.blocks_for(seq.num_tokens + 1)
        slots = self.config.max_num_seqs - len(self.running) - len(self.cpu_queue) - 1
        for s in self.waiting:
            if len(follow) >= slots or free <= 0:
                break  # no more rows or host blocks: nothing further in the queue can follow
            need = self.cpu.blocks_for(s.num_tokens + 1)
            if s is seq or s.num_computed or need > free:
                continue
            follow.append(s.num_tokens + 1)
            free -= need
        queued = [s.num_tokens + 1 for s in self.cpu_queue]
        cpu = [seq.num_tokens + 1, *queued] if front else [*queued, seq.num_tokens + 1]
        candidate = BatchCandidate(
            gpu_decode_lens=[s.num_tokens + 1 for s in self.running if s.place is Place.GPU and s is not seq],
            cpu_decode_lens=cpu + follow)
        return self._decide(candidate).cpu_sub_batch[0 if front else len(queued)] != WAIT

    def _place_cpu_decodes(self, out: SchedulerOutput, cpu_decodes: list[Sequence], budget: int) -> None:
        """Ask the policy which CPU decodes run (and in which sub-batch); grow their CPU tables."""
        runnable, reserved = [], 0
        for seq in cpu_decodes[:max(0, budget)]:
            if not self.cpu.can_allocate(seq.seq_id, seq.num_computed + 1, reserve=reserved):
                break  # the CPU pool is full: it waits until a CPU request finishes
            reserved += self.cpu.num_missing(seq.seq_id, seq.num_computed + 1)   # the earlier ones grow too
            runnable.append(seq)
        out.decision = self._decide(self._candidate(out.rows, runnable))
        for seq, sub_batch in zip(runnable, out.decision.cpu_sub_batch):
            if sub_batch == WAIT:
                continue
            self.cpu.allocate(seq.seq_id, seq.num_computed + 1)
            sample = seq.num_computed + 1 == seq.num_tokens   # false while a CPU-direct prompt is fed
            out.rows.append(ScheduledSeq(seq, seq.num_computed, 1, sample, sub_batch))

    @staticmethod
    def _candidate(rows: list[ScheduledSeq], cpu_decodes: list[Sequence]) -> BatchCandidate:
        prefills = [r for r in rows if r.num_tokens > 1]
        return BatchCandidate(
            prefill_lens=[r.num_tokens for r in prefills], prefill_starts=[r.start for r in prefills],
            gpu_decode_lens=[r.start + 1 for r in rows if r.num_tokens == 1],
            cpu_decode_lens=[s.num_computed + 1 for s in cpu_decodes])

    def recompute(self, seq: Sequence) -> bool:
        """Preempt a running GPU request by recompute outside a schedule (its iteration failed, so
        its KV cannot be trusted); False if it is not running on the GPU."""
        if seq.status is not SeqStatus.RUNNING or seq.place is not Place.GPU or seq not in self.running:
            return False
        self._preempt(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = seq.num_registered_blocks = 0
        seq.status, seq.place = SeqStatus.WAITING, Place.GPU
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("preempted seq %d (recompute); %d free blocks", seq.seq_id, self.gpu.num_free)

    def _free(self, seq: Sequence) -> None:
        self.gpu.free(seq.seq_id)
        if self.cpu is not None:
            self.cpu.free(seq.seq_id)

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[tuple[Sequence, int, FinishReason | None]]:
        """Apply an iteration's results: advance KV counts, append sampled tokens.

        Returns (seq, token, finish_reason) for every sampled token; sequences that finish here are
        already removed and their blocks freed.
        """
        events = []
        if self.host is not None:
            self.host.confirm(output.iteration_id)
        for row in output.rows:
            seq = row.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the iteration ran
            seq.num_computed = row.start + row.num_tokens
            self._register_computed(seq)
            if not row.sample:
                continue
            token = sampled[seq.seq_id]
            reason = seq.append_token(token)
            if reason is not None:
                self.finish(seq, reason)
            events.append((seq, token, reason))
        return events

