"""Continuous batching with chunked prefill under a token budget (GPU-only mode).

Each ``schedule()`` call forms one iteration:
1. running requests, oldest first: a decode token each, or the next chunk of an unfinished prompt;
2. waiting requests, FCFS, while the token budget, the sequence budget and free blocks allow.

Preemption is by recompute: when the GPU pool cannot grow a running request, the newest running
request gives up its blocks and goes back to the front of the waiting queue with its generated
tokens kept, to be prefilled again. Recompute is chosen because, in GPU-only mode, a swap would
need a host pool that only exists once CPU offloading is configured, and for the prompt lengths a
single GPU serves, re-prefilling costs less than moving the KV over PCIe twice. With offloading on,
the NEO scheduler swaps instead, since the request then keeps decoding on the CPU.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import numpy as np

from neo_common.config import SchedulerConfig
from neo_common.protocol import IterationPlan
from neo_gateway.block_manager import BlockManager
from neo_gateway.sequence import FinishReason, Sequence, SeqStatus

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledSeq:
    """One row of an iteration: ``num_tokens`` new tokens of ``seq`` starting at ``start``."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool
    sub_batch: int = 0


@dataclasses.dataclass
class SchedulerOutput:
    iteration_id: int
    rows: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def is_empty(self) -> bool:
        return not self.rows

    def to_plan(self, gpu_blocks: BlockManager) -> IterationPlan:
        rows = self.rows
        tables = [gpu_blocks.table(r.seq.seq_id) for r in rows]
        width = max((len(t) for t in tables), default=0)
        bt = np.full((len(rows), width), -1, dtype=np.int32)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = t
        tokens: list[int] = []
        for r in rows:
            tokens.extend(r.seq.token_slice(r.start, r.start + r.num_tokens))
        params = [r.seq.params for r in rows]
        return IterationPlan(
            iteration_id=self.iteration_id,
            seq_ids=np.array([r.seq.seq_id for r in rows], np.int64),
            places=np.array([int(r.seq.place) for r in rows], np.uint8),
            sub_batch=np.array([r.sub_batch for r in rows], np.uint8),
            start_pos=np.array([r.start for r in rows], np.int32),
            num_tokens=np.array([r.num_tokens for r in rows], np.int32),
            token_ids=np.array(tokens, np.int32),
            block_tables=bt,
            sample=np.array([r.sample for r in rows], np.uint8),
            temperature=np.array([p.temperature for p in params], np.float32),
            top_p=np.array([p.top_p for p in params], np.float32),
            top_k=np.array([p.top_k for p in params], np.int32),
            seeds=np.array([-1 if p.seed is None else p.seed for p in params], np.int64),
            steps=np.array([len(r.seq.output_ids) for r in rows], np.int32),
        )


class Scheduler:
    """Decides every iteration which requests run and how many tokens each feeds.

    - ``waiting``: FCFS queue of requests without KV (new or preempted).
    - ``running``: requests holding GPU blocks, in admission order (oldest first).
    - ``gpu``: the GPU pool's block manager.
    - ``iteration``: id of the last scheduled iteration.
    """

    def __init__(self, config: SchedulerConfig, gpu_blocks: BlockManager) -> None:
        self.config = config
        self.gpu = gpu_blocks
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.iteration = 0
        self.num_preemptions = 0

    # -- queue management ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a request wherever it is and return its blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.gpu.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- the per-iteration decision -----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.iteration += 1
        budget = self.config.max_num_batched_tokens
        rows: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget == 0:
                break
            n = min(seq.num_pending, budget)
            while not self.gpu.can_allocate(seq.seq_id, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.gpu.allocate(seq.seq_id, seq.num_computed + n)
            rows.append(ScheduledSeq(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens))
            budget -= n

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = min(seq.num_pending, budget)
            if not self.gpu.can_allocate(seq.seq_id, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.gpu.allocate(seq.seq_id, seq.num_computed + n)
            seq.status = SeqStatus.RUNNING
            if seq.scheduled_time is None:
                seq.scheduled_time = time.monotonic()
            self.running.append(seq)
            rows.append(ScheduledSeq(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens))
            budget -= n
        return SchedulerOutput(self.iteration, rows, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.gpu.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("preempted seq %d (recompute); %d free blocks", seq.seq_id, self.gpu.num_free)

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[tuple[Sequence, int, FinishReason | None]]:
        """Apply an iteration's results: advance KV counts, append sampled tokens.

        Returns (seq, token, finish_reason) for every sampled token; sequences that finish here are
        already removed and their blocks freed.
        """
        events = []
        for row in output.rows:
            seq = row.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the iteration ran
            seq.num_computed = row.start + row.num_tokens
            if not row.sample:
                continue
            token = sampled[seq.seq_id]
            reason = seq.append_token(token)
            if reason is not None:
                self.finish(seq, reason)
            events.append((seq, token, reason))
        return events
