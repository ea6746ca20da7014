"""One iteration as the scheduler decided it, and its translation into the workers' messages."""

from __future__ import annotations

import dataclasses

import numpy as np

from neo_common.protocol import PLACEHOLDER_TOKEN, CpuAttentionPlan, IterationPlan, Place
from neo_gateway.block_manager import BlockManager
from neo_common.block_runs import merge_runs
from neo_gateway.offload_policy import OffloadDecision, PlanKind
from neo_gateway.sequence import Sequence
from neo_gateway.structured_output import bitmask_width, distinct_rows, fill_bitmasks


@dataclasses.dataclass
class ScheduledSeq:
    """One row of an iteration: ``num_tokens`` new tokens of ``seq`` starting at ``start``, in
    pipeline sub-batch ``sub_batch``. The row's KV pool is ``seq.place`` as of this iteration.
    ``placeholder``: scheduled ahead (``Scheduler.schedule_ahead``): its one token is the one the
    previous iteration samples, not yet known here; the worker feeds it from its own last sample."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool
    sub_batch: int = 0
    placeholder: bool = False

    @property
    def constrained(self) -> bool:
        """A grammar constrains the token this row samples (its mask is in the plan's ``bitmask_rows``)."""
        return self.sample and self.seq.structured is not None

    @property
    def cpu_decode(self) -> bool:
        """Attention of this row runs in the cpu_attention process (one new token, KV on the host)."""
        return self.seq.place is Place.CPU and self.num_tokens == 1


@dataclasses.dataclass
class SchedulerOutput:
    """What one ``Scheduler.schedule()`` call decided.

    - ``rows``: the rows to run, GPU rows first, then CPU decodes.
    - ``preempted``: requests that lost their KV (recompute) this iteration.
    - ``swapped_out``/``swapped_in``: requests moved between pools; ``swap_out_pairs`` and
      ``swap_in_pairs`` their (source blocks, destination blocks), copied before the forward.
    - ``demote_pairs``: (GPU blocks, host blocks) the host tier copies beside the forward
      (``HostTier.flush``).
    - ``decision``: the offload policy's plan (None in GPU-only mode).
    """

    iteration_id: int
    rows: list[ScheduledSeq]
    preempted: list[Sequence]
    swapped_out: list[Sequence] = dataclasses.field(default_factory=list)
    swapped_in: list[Sequence] = dataclasses.field(default_factory=list)
    swap_out_pairs: list[tuple[list[int], list[int]]] = dataclasses.field(default_factory=list)
    swap_in_pairs: list[tuple[list[int], list[int]]] = dataclasses.field(default_factory=list)
    demote_pairs: list[tuple[list[int], list[int]]] = dataclasses.field(default_factory=list)
    decision: OffloadDecision | None = None

    @property
    def is_empty(self) -> bool:
        return not self.rows and not self.swap_out_pairs and not self.swap_in_pairs

    @property
    def pipelined(self) -> bool:
        return self.decision is not None and self.decision.kind == PlanKind.PIPELINED

    @property
    def cpu_rows(self) -> list[ScheduledSeq]:
        return [r for r in self.rows if r.cpu_decode]

    @property
    def constrained_rows(self) -> list[ScheduledSeq]:
        """The sampling rows a grammar constrains, in plan order (the plan's ``bitmask_rows``)."""
        return [r for r in self.rows if r.constrained]

    @property
    def bitmask_deferred(self) -> bool:
        """Its constrained rows were scheduled ahead: their masks need the tokens the previous
        iteration samples, and follow the plan (``grammar_bitmask``, sent as ``GrammarBitmask``)."""
        return any(r.placeholder for r in self.constrained_rows)

    def grammar_bitmask(self, allow_all: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The constrained rows' masks as of now (after the previous iteration's tokens). A request
        that ended meanwhile, or whose grammar did, gets every token: the worker samples its row
        all the same and ``Scheduler.update`` discards the token. ``allow_all``: every row so (an
        iteration failed already, whose tokens nobody reads). Returns (distinct masks, each row's
        index among them): ``GrammarBitmask``'s ``bitmask`` and ``bitmask_index``."""
        return distinct_rows(_masks([r.seq for r in self.constrained_rows], allow_all))

    def _tables(self, rows: list[ScheduledSeq], gpu: BlockManager, cpu: BlockManager | None) -> np.ndarray:
        tables = [(cpu if r.seq.place is Place.CPU else gpu).table(r.seq.seq_id) for r in rows]
        width = max((len(t) for t in tables), default=0)
        bt = np.full((len(rows), width), -1, dtype=np.int32)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = t
        return bt

    def to_plan(self, gpu: BlockManager, cpu: BlockManager | None = None) -> IterationPlan:
        rows = self.rows
        tokens: list[int] = []
        for r in rows:
            tokens.extend((PLACEHOLDER_TOKEN,) if r.placeholder else r.seq.token_slice(r.start, r.start + r.num_tokens))
        params = [r.seq.params for r in rows]
        return IterationPlan(
            iteration_id=self.iteration_id,
            seq_ids=np.array([r.seq.seq_id for r in rows], np.int64),
            places=np.array([int(r.seq.place) for r in rows], np.uint8),
            sub_batch=np.array([r.sub_batch for r in rows], np.uint8),
            start_pos=np.array([r.start for r in rows], np.int32),
            num_tokens=np.array([r.num_tokens for r in rows], np.int32),
            token_ids=np.array(tokens, np.int32),
            block_tables=self._tables(rows, gpu, cpu),
            sample=np.array([r.sample for r in rows], np.uint8),
            temperature=np.array([p.temperature for p in params], np.float32),
            top_p=np.array([p.top_p for p in params], np.float32),
            top_k=np.array([p.top_k for p in params], np.int32),
            seeds=np.array([-1 if p.seed is None else p.seed for p in params], np.int64),
            steps=np.array([len(r.seq.output_ids) + r.placeholder for r in rows], np.int32),
            min_p=np.array([p.min_p for p in params], np.float32),
            **_bias_columns(params),
            **_penalty_columns(rows),
            **_bitmask_columns(rows),
            **_logprob_columns(rows),
            swap_out=_runs(self.swap_out_pairs),
            swap_in=_runs(self.swap_in_pairs),
            demote=_runs(self.demote_pairs),
        )

    def to_cpu_plan(self, cpu: BlockManager) -> CpuAttentionPlan | None:
        """The CPU decodes per sub-batch, in plan row order (= staging-slot row order); None if none."""
        per_sb: list[list[ScheduledSeq]] = [[], []]
        for r in self.cpu_rows:
            per_sb[r.sub_batch].append(r)
        if not per_sb[0] and not per_sb[1]:
            return None
        return CpuAttentionPlan(
            iteration_id=self.iteration_id,
            seq_ids=[np.array([r.seq.seq_id for r in rows], np.int64) for rows in per_sb],
            seq_lens=[np.array([r.start + 1 for r in rows], np.int32) for rows in per_sb],
            block_tables=[self._tables(rows, cpu, cpu) for rows in per_sb],
        )


def _bias_columns(params: list) -> dict[str, np.ndarray]:
    """The rows' logit biases as the plan's sparse (row, token, value) columns."""
    entries = [(i, t, v) for i, p in enumerate(params) for t, v in p.logit_bias.items()]
    return {"bias_rows": np.array([e[0] for e in entries], np.int32),
            "bias_ids": np.array([e[1] for e in entries], np.int32),
            "bias_values": np.array([e[2] for e in entries], np.float32)}


def _penalty_columns(rows: list) -> dict[str, np.ndarray]:
    """Penalties of the sampling rows and their token history (generated tokens; the prompt's too
    for a repetition penalty). Empty when no row is penalized."""
    penalized = [i for i, r in enumerate(rows) if r.sample and r.seq.params.has_penalties]
    if not penalized:
        return {}
    entries: list[tuple[int, int, int]] = []
    for i in penalized:
        seq = rows[i].seq
        entries += [(i, t, 1) for t in seq.output_ids]
        if seq.params.repetition_penalty != 1.0:
            entries += [(i, t, 0) for t in seq.prompt_ids]
    return {"penalties": np.array([[p.presence_penalty, p.frequency_penalty, p.repetition_penalty]
                                   for p in (r.seq.params for r in rows)], np.float32).reshape(len(rows), 3),
            "hist_rows": np.array([e[0] for e in entries], np.int32),
            "hist_ids": np.array([e[1] for e in entries], np.int32),
            "hist_output": np.array([e[2] for e in entries], np.uint8)}


def _logprob_columns(rows: list) -> dict[str, np.ndarray]:
    """``logprobs`` of the sampling rows that ask (empty when none does), and the prompt positions
    whose logprobs are still missing in each prompt chunk that asks (``Sequence.prompt_logprob_span``)."""
    out: dict[str, np.ndarray] = {}
    if any(r.sample and r.seq.params.logprobs is not None for r in rows):
        out["logprobs"] = np.array([r.seq.params.logprobs if r.sample and r.seq.params.logprobs is not None
                                    else -1 for r in rows], np.int8)
    spans = []
    for i, r in enumerate(rows):
        span = r.seq.prompt_logprob_span(r.start, r.num_tokens) if not r.placeholder else None
        if span is not None:
            spans.append((i, *span, r.seq.params.prompt_logprobs, r.seq.prompt_ids))
    if spans:
        out |= {"plp_rows": np.array([s[0] for s in spans], np.int32),
                "plp_first": np.array([s[1] for s in spans], np.int32),
                "plp_count": np.array([s[2] for s in spans], np.int32),
                "plp_k": np.array([s[3] for s in spans], np.int8),
                "plp_targets": np.array([t for i, first, count, _, ids in spans
                                         for t in ids[rows[i].start + first + 1:rows[i].start + first + 1 + count]],
                                        np.int32)}
    return out


def _bitmask_columns(rows: list) -> dict:
    """The grammar masks of the sampling rows a grammar constrains (none: no columns): each the
    mask after every token its request has accepted, or, when those rows are placeholders (all of
    them: ``Scheduler.schedule_ahead`` schedules only placeholders), deferred."""
    held = [i for i, r in enumerate(rows) if r.constrained]
    if not held:
        return {}
    out: dict = {"bitmask_rows": np.array(held, np.int32)}
    if any(rows[i].placeholder for i in held):
        assert all(rows[i].placeholder for i in held), "masks are deferred for a whole plan or not at all"
        return out | {"bitmask_deferred": True}
    masks, index = distinct_rows(_masks([rows[i].seq for i in held]))
    return out | {"bitmask": masks, "bitmask_index": index}


def _masks(seqs: list[Sequence], allow_all: bool = False) -> np.ndarray:
    """``fill_bitmasks`` of the sequences whose grammar can go on; all-ones rows for the others."""
    live = [] if allow_all else [i for i, s in enumerate(seqs) if not s.is_finished and not s.structured.terminated]
    width = bitmask_width(seqs[0].structured.vocab_size)
    out = np.full((len(seqs), width), -1, np.int32)
    if live:
        out[live] = fill_bitmasks([seqs[i].structured for i in live])
    return out


def _runs(pairs: list[tuple[list[int], list[int]]]) -> np.ndarray:
    src = [b for s, _ in pairs for b in s]
    dst = [b for _, d in pairs for b in d]
    return merge_runs(src, dst)
