"""The per-iteration offload decision, as a pure function of a candidate batch (docs/design.md, "The
offload policy and cost tables").

``decide(candidate, costs, mode)`` builds both plans and keeps one:

1. Sequential: one stage per layer with every prefill and GPU decode; CPU-resident decodes wait.
2. Pipelined (asymmetric): sub-batch 0 holds every prefill and GPU decode. CPU decodes are taken in
   FCFS order; each goes to the sub-batch with more slack, where the slack of sub-batch j is
   ``linr(S_other) + pref_j + gdec_j - (cdec_j + lnch)``, and is kept only if afterwards, for both
   sub-batches j that hold CPU rows, ``linr(S_other) + pref_j + gdec_j >= cdec_j + lnch`` (CPU
   attention of j hides behind the GPU work of its stage). If it fits neither sub-batch the scan
   stops there (FCFS: later requests do not overtake it) and the rest wait. A sub-batch without CPU
   rows launches no CPU work, so its CPU side is 0 and it needs no hiding.

GPU time per layer (what "requests served per unit GPU time" divides by), from the tables:

- a stage costs ``max(G, C) + lnch``: ``G`` is the GPU work queued in it, ``C`` the CPU attention it
  waits for (``cdec + lnch`` of its CPU rows, 0 without), and ``lnch`` the fixed host overhead every
  stage pays (launch and synchronisation, during which the GPU idles at the stage boundary);
- sequential: one stage, ``G = linr(S) + sum pref + gdec(N_gpu)``, ``C = 0``;
- pipelined: stage j has ``G_j = linr(S_{1-j}) + pref_j + gdec_j`` (stage A runs sub-batch 1's dense
  work beside sub-batch 0's attention, stage B the converse), so the two stages together run every
  dense and GPU-attention kernel once, split in two, plus one more ``lnch``. With the inequality
  held, ``max(G_j, C_j) = G_j``: the CPU costs no GPU time, and what pipelining pays is the dense
  work split into two smaller, less efficient matmuls plus the extra stage overhead.

Requests served counts rows (each prefill chunk and each decode). The pipelined plan is kept only
when it serves strictly more rows per second of GPU time (a tie keeps the simpler sequential plan).
Modes: ``throughput`` also weighs the pipeline with every CPU decode, hidden or not, and keeps
whichever of the three plans serves the most rows per second (see ``_most_rows_per_second``; the
slack inequality then does not bind); ``off`` always sequential; ``full`` pipelines every CPU decode without the inequality (the
scheduler then sends every request to the CPU, so every decode is a CPU decode; for comparison runs; the CPU may then be the bottleneck, which the stage times show); ``auto`` as above.
If neither plan would serve anything (only CPU-resident decodes, none hideable), ``auto`` runs them
unhidden like ``full`` rather than stall them: idle GPU time is free.

Per iteration the scheduler (``scheduler.Scheduler``) (1) swaps the newest GPU request out if the
GPU pool cannot grow its requests, else swaps in with ``choose_swap_in``; copies become
``neo_common.block_runs.merge_runs`` runs; (2) places new prompts (GPU first; once one goes to the CPU the rest of the
round follows); (3) calls ``decide`` on what could run and schedules prefills and GPU decodes in
sub-batch 0, CPU decode i in ``cpu_sub_batch[i]``, and leaves ``cpu_waiting``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Sequence


from neo_common.enums import OffloadMode
from neo_common.cost_model import CostTables

WAIT = -1  # sub-batch index of a CPU decode that does not run this iteration


class PlanKind(enum.IntEnum):
    SEQUENTIAL = 0
    PIPELINED = 1


@dataclasses.dataclass(frozen=True)
class BatchCandidate:
    """What could run this iteration, after the scheduler applied its budgets.

    - ``prefill_lens[i]``: new prompt tokens of prefill row i; ``prefill_starts[i]`` the tokens of
      that prompt already cached (chunked prefill; empty means all 0).
    - ``gpu_decode_lens``: context length (including the new token) of each GPU-resident decode.
    - ``cpu_decode_lens``: the same for CPU-resident decodes, in FCFS order (CPU queue order).
    """

    prefill_lens: Sequence[int] = ()
    gpu_decode_lens: Sequence[int] = ()
    cpu_decode_lens: Sequence[int] = ()
    prefill_starts: Sequence[int] = ()

    def __post_init__(self) -> None:
        if self.prefill_starts and len(self.prefill_starts) != len(self.prefill_lens):
            raise ValueError("prefill_starts must be empty or match prefill_lens")


@dataclasses.dataclass(frozen=True)
class StageCost:
    """Predicted per-layer times of one stage (seconds). ``gpu_s`` G, ``cpu_s`` C, ``stage_s`` the stage."""

    tokens: int          # batch tokens of the sub-batch whose attention runs in this stage
    dense_tokens: int    # batch tokens of the dense work in this stage (the other sub-batch when pipelined)
    linr: float
    pref: float
    gdec: float
    cdec: float
    gpu_s: float
    cpu_s: float
    stage_s: float


@dataclasses.dataclass(frozen=True)
class OffloadDecision:
    """The plan kept for one iteration.

    Prefill rows and GPU decode rows always run in sub-batch 0. ``cpu_sub_batch[i]`` is the
    sub-batch (0/1) of CPU decode i of the candidate, or ``WAIT``. ``stages`` holds one StageCost
    (sequential) or two (pipelined: stage j hides sub-batch j's CPU attention). Times are per layer.
    """

    kind: PlanKind
    mode: str
    cpu_sub_batch: tuple[int, ...]
    stages: tuple[StageCost, ...]
    layer_s: float               # predicted GPU time per layer of the kept plan
    rows: int                    # rows served by the kept plan
    sequential_rate: float       # rows per second of per-layer GPU time, each candidate plan
    pipelined_rate: float
    reason: str

    @property
    def cpu_waiting(self) -> list[int]:
        return [i for i, j in enumerate(self.cpu_sub_batch) if j == WAIT]

    def cpu_rows(self, sub_batch: int) -> list[int]:
        return [i for i, j in enumerate(self.cpu_sub_batch) if j == sub_batch]

    @property
    def rate(self) -> float:
        """Rows per second of per-layer time of the kept plan."""
        return self.pipelined_rate if self.kind == PlanKind.PIPELINED else self.sequential_rate

    def predicted_forward_s(self, num_layers: int) -> float:
        """Predicted time of the whole decoder stack (metrics compare it with the measured forward)."""
        return self.layer_s * num_layers


@dataclasses.dataclass
class _SubBatch:
    tokens: int = 0
    pref: float = 0.0
    gdec_tokens: int = 0
    cpu_rows: int = 0
    cpu_tokens: int = 0


def _stage(costs: CostTables, att: _SubBatch, dense: _SubBatch | None) -> StageCost:
    """Stage whose attention is ``att``'s and whose dense work is ``dense``'s (itself when sequential)."""
    dense = att if dense is None else dense
    linr, gdec = costs.linr(dense.tokens), costs.gdec(att.gdec_tokens)
    cdec = costs.cdec(att.cpu_rows, att.cpu_tokens)
    gpu = linr + (att.pref + gdec)  # summed as _assign sums it, so both agree to the last bit
    cpu = cdec + costs.lnch if att.cpu_rows else 0.0
    return StageCost(att.tokens, dense.tokens, linr, att.pref, gdec, cdec, gpu, cpu, max(gpu, cpu) + costs.lnch)


def hidden(stage: StageCost) -> bool:
    """The slack inequality for one stage (vacuous without CPU rows)."""
    return stage.cpu_s == 0.0 or stage.gpu_s >= stage.cpu_s


def _base(costs: CostTables, c: BatchCandidate) -> _SubBatch:
    starts = c.prefill_starts or [0] * len(c.prefill_lens)
    sb = _SubBatch()
    sb.tokens = sum(c.prefill_lens) + len(c.gpu_decode_lens)
    sb.pref = sum(costs.prefill_chunk(n, s) for n, s in zip(c.prefill_lens, starts))
    sb.gdec_tokens = sum(c.gpu_decode_lens)
    return sb


def _assign(costs: CostTables, c: BatchCandidate, enforce: bool) -> tuple[list[int], list[_SubBatch]]:
    """Greedy FCFS placement of CPU decodes into the sub-batch with more slack (ties: sub-batch 1).

    Plain floats, one ``linr`` and one ``cdec`` lookup per decode: this runs every iteration over up
    to a few hundred CPU decodes, inside the scheduler's overhead budget. The numbers are the same
    calls ``_stage`` makes, so the StageCosts built afterwards agree with the checks made here.
    """
    sbs = [_base(costs, c), _SubBatch()]
    lnch = costs.lnch
    att = [sbs[0].pref + costs.gdec(sbs[0].gdec_tokens), 0.0]     # GPU attention of each stage
    lin = [costs.linr(sbs[0].tokens), 0.0]                           # dense work of each sub-batch
    cd = [0.0, 0.0]                                                   # CPU attention of each sub-batch
    where = [WAIT] * len(c.cpu_decode_lens)
    for i, n in enumerate(c.cpu_decode_lens):
        slack0 = lin[1] + att[0] - cd[0] - lnch
        slack1 = lin[0] + att[1] - cd[1] - lnch
        first = 0 if slack0 > slack1 else 1
        for j in (first, 1 - first) if enforce else (first,):
            k, sb, other = 1 - j, sbs[j], sbs[1 - j]
            new_lin = costs.linr(sb.tokens + 1)
            new_cd = costs.cdec(sb.cpu_rows + 1, sb.cpu_tokens + n)
            ok = (lin[k] + att[j] >= new_cd + lnch
                  and (other.cpu_rows == 0 or new_lin + att[k] >= cd[k] + lnch))
            if ok or not enforce:
                sb.tokens, sb.cpu_rows, sb.cpu_tokens = sb.tokens + 1, sb.cpu_rows + 1, sb.cpu_tokens + n
                lin[j], cd[j], where[i] = new_lin, new_cd, j
                break
        if where[i] == WAIT:
            break  # FCFS: nothing behind it overtakes
    return where, sbs


def decide(candidate: BatchCandidate, costs: CostTables, mode: OffloadMode = OffloadMode.AUTO,
           pipeline_overhead: float = 0.0) -> OffloadDecision:
    """Choose this iteration's plan; pure (no state, no I/O). See the module docstring.
    ``pipeline_overhead``: seconds each pipelined stage costs beyond the tables (the scheduler
    learns it from measured forwards; the sequential plan does not pay it)."""
    mode = OffloadMode(mode)   # raises on anything else
    c = candidate
    n_cpu = len(c.cpu_decode_lens)
    seq_rows = len(c.prefill_lens) + len(c.gpu_decode_lens)
    seq_stage = _stage(costs, _base(costs, c), None)
    seq_rate = seq_rows / seq_stage.stage_s if seq_rows and seq_stage.stage_s > 0 else 0.0
    sequential = OffloadDecision(PlanKind.SEQUENTIAL, mode, (WAIT,) * n_cpu, (seq_stage,), seq_stage.stage_s,
                                 seq_rows, seq_rate, 0.0, "")
    if mode is OffloadMode.OFF or n_cpu == 0:
        why = "offload off" if mode is OffloadMode.OFF else "no CPU-resident decodes"
        return dataclasses.replace(sequential, reason=why)

    if mode is OffloadMode.THROUGHPUT:
        return _most_rows_per_second(costs, c, sequential, pipeline_overhead)
    where, sbs = _assign(costs, c, enforce=(mode is OffloadMode.AUTO))
    reason = "full offload" if mode is OffloadMode.FULL else "pipelined serves more rows per GPU second"
    if mode is OffloadMode.AUTO and all(j == WAIT for j in where):
        if seq_rows:
            return dataclasses.replace(sequential, reason="no CPU decode can hide behind the GPU work")
        where, sbs = _assign(costs, c, enforce=False)
        reason = "only CPU decodes: run them unhidden rather than stall"
    pipelined = _pipelined(costs, where, sbs, sequential, reason, pipeline_overhead)
    if mode is OffloadMode.AUTO and seq_rows and pipelined.pipelined_rate <= seq_rate:
        return dataclasses.replace(sequential, pipelined_rate=pipelined.pipelined_rate,
                                   reason="sequential serves at least as many rows per GPU second")
    return pipelined


def _pipelined(costs: CostTables, where: list[int], sbs: list[_SubBatch], sequential: OffloadDecision,
               reason: str, overhead: float = 0.0) -> OffloadDecision:
    stages = (_stage(costs, sbs[0], sbs[1]), _stage(costs, sbs[1], sbs[0]))
    layer_s = stages[0].stage_s + stages[1].stage_s + 2 * overhead
    rows = sequential.rows + sum(j != WAIT for j in where)
    pipe_rate = rows / layer_s if layer_s > 0 else 0.0
    return OffloadDecision(PlanKind.PIPELINED, sequential.mode, tuple(where), stages, layer_s, rows,
                           sequential.sequential_rate, pipe_rate, reason)


def _most_rows_per_second(costs: CostTables, c: BatchCandidate, sequential: OffloadDecision,
                          overhead: float = 0.0) -> OffloadDecision:
    """``throughput`` mode: the sequential plan, the hidden pipeline (as ``auto``) and the pipeline
    with every CPU decode (unhidden: stages wait for the CPU), whichever serves the most rows per
    second of wall time. Where launches or a fast GPU leave little GPU work to hide behind, running
    the CPU decodes anyway can still multiply throughput, at the price of longer iterations (TPOT)."""
    best = sequential if sequential.rows else None
    for enforce, why in ((True, "hidden pipeline serves the most rows per second"),
                         (False, "unhidden pipeline serves the most rows per second")):
        where, sbs = _assign(costs, c, enforce=enforce)
        if all(j == WAIT for j in where):
            continue
        plan = _pipelined(costs, where, sbs, sequential, why, overhead)
        if best is None or plan.rate > best.rate:
            best = plan
    if best is sequential:
        return dataclasses.replace(sequential, reason="sequential serves the most rows per second")
    return best


# -- placement and swapping (pure helpers the scheduler applies to its queues and block managers) ----
def choose_swap_in(cpu_queue: Sequence[tuple[int, int]], gpu_used: int, gpu_total: int,
                   threshold: float) -> list[int]:
    """CPU requests to bring back to the GPU, oldest (front of the queue) first.

    ``cpu_queue`` is (seq_id, blocks held) in queue order. A request comes back only if GPU use stays
    at or below ``threshold`` (SchedulerConfig.swap_in_threshold) *after* its blocks arrive. Swap-out
    happens only when the GPU pool runs out (use 100%), so the band between the threshold and 100%
    is the hysteresis: a request swapped in leaves room for the others to grow before anyone has to
    leave again, instead of swapping out and in every iteration. FCFS: the first that does not fit
    ends the scan.
    """
    chosen: list[int] = []
    limit = threshold * gpu_total
    for seq_id, held in cpu_queue:
        if gpu_used + held > limit:
            break
        chosen.append(seq_id)
        gpu_used += held
    return chosen
