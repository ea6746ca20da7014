"""Block accounting of the prefix cache and its host tier under random sequences of admissions,
multi-turn follow-ups, aborts, preemptions, swaps, evictions, demotions, failed iterations and
scheduling ahead (hypothesis).

Besides the books (reference counts = the tables and reservations that hold each block; every
block exactly free, evictable or held; no leak once everything ends), a shadow KV memory runs each
plan as the worker does: swap-outs, then swap-ins, the demotions beside the forward (whose blocks
nothing else of the plan may touch), then the forward, which first checks that every
position a row attends over holds the KV of that row's own tokens (a stale, overwritten or foreign
block fails), then writes its new positions. So the copy order of shared iterations is checked too.
"""

from __future__ import annotations

import collections
import dataclasses

from hypothesis import HealthCheck, given, settings, strategies as st

from support.cost_tables import synthetic
from neo_common.config import SchedulerConfig
from neo_common.protocol import Place
from neo_gateway.block_manager import BlockManager
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.scheduler import Scheduler
from neo_gateway.sequence import FinishReason, Sequence, SeqStatus

BS = 4
PREFIXES = [list(range(100, 112)), list(range(200, 208)), list(range(100, 106)) + [300, 301]]
TALLY: collections.Counter = collections.Counter()


def kv(seq: Sequence, pos: int) -> int:
    """What the KV at ``pos`` of ``seq`` is a function of: its tokens up to there."""
    return hash(tuple(seq.token_slice(0, pos + 1)))


def next_token(seq: Sequence) -> int:
    """A deterministic "model": the token depends on the history alone (2 is the stop token)."""
    tokens = seq.token_slice(0, seq.num_tokens)
    return (sum(tokens[-3:]) * 7 + len(tokens)) % 23 + 2


class Shadow:
    """The pools' contents as the worker would leave them: one value per KV slot."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.mem = {Place.GPU: [[None] * BS for _ in range(sched.gpu.num_blocks)],
                    Place.CPU: [[None] * BS for _ in range(sched.cpu.num_blocks if sched.cpu else 0)]}

    def capture(self, out):
        """The block tables as the plan carries them (taken when it is sent)."""
        return [(r.seq.place, list((self.sched.cpu if r.seq.place is Place.CPU else self.sched.gpu).table(r.seq.seq_id)))
                for r in out.rows]

    def run(self, out, tables) -> None:
        outs = [(s, d) for src, dst in out.swap_out_pairs for s, d in zip(src, dst)]
        ins = [(s, d) for src, dst in out.swap_in_pairs for s, d in zip(src, dst)]
        written = [d for _, d in outs]
        assert len(set(written)) == len(written), "a host block written twice by one plan's swap-outs"
        assert not set(written) & {s for s, _ in ins}, "a host block read by a swap-in is overwritten first"
        # demotions beside the forward: neither side may be touched by anything else of the plan
        beside = [(s, d) for src, dst in out.demote_pairs for s, d in zip(src, dst)]
        host_dst = written + [d for _, d in beside]
        assert len(set(host_dst)) == len(host_dst), "a host block written twice by one plan's copies"
        rows_touch = {place: {b for p, t in tables if p is place for b in t} for place in (Place.GPU, Place.CPU)}
        assert not {s for s, _ in beside} & (rows_touch[Place.GPU] | {d for _, d in ins}), \
            "a GPU block copied beside the forward is written by the plan"
        assert not {d for _, d in beside} & (rows_touch[Place.CPU] | {s for s, _ in ins}), \
            "a host block written beside the forward is used by the plan"
        for s, d in outs + beside:
            self.mem[Place.CPU][d] = list(self.mem[Place.GPU][s])
        for s, d in ins:
            self.mem[Place.GPU][d] = list(self.mem[Place.CPU][s])
        for row, (place, table) in zip(out.rows, tables):
            seq, mem = row.seq, self.mem[place]
            if seq.status is SeqStatus.RUNNING:     # (a row of a request that ended meanwhile is discarded)
                for pos in range(row.start):
                    assert mem[table[pos // BS]][pos % BS] == kv(seq, pos), \
                        f"seq {seq.seq_id} reads wrong KV at {pos} ({place.name} block {table[pos // BS]})"
            for pos in range(row.start, row.start + row.num_tokens):
                mem[table[pos // BS]][pos % BS] = kv(seq, pos)


def check_books(sched: Scheduler) -> None:
    pending = collections.Counter(b for v in (sched.host.demoting.values() if sched.host else ()) for b, _ in v)
    for pool, extra in ((sched.gpu, collections.Counter()), (sched.cpu, pending)):
        if pool is None:
            continue
        refs = collections.Counter(b for t in pool.tables.values() for b in t) + extra
        assert not pool.held, "references held for an iteration outlived its scheduling"
        free, evictable = list(pool.free_blocks), set(pool.evictable)
        assert len(set(free)) == len(free), "a block freed twice"
        for b in range(pool.num_blocks):
            assert pool.ref_count[b] == refs[b], f"{pool.place.name} block {b}: {pool.ref_count[b]} refs, held {refs[b]}"
            assert (b in free) + (b in evictable) + (refs[b] > 0) == 1, f"{pool.place.name} block {b} is in two states"
        assert evictable <= pool.hash_of.keys() and not set(free) & pool.hash_of.keys()
        assert {b: h for h, b in pool.cached.items()} == pool.hash_of
        assert pool.budget is None or len(evictable) <= pool.budget
    assert set(sched.gpu.tables) == {s.seq_id for s in sched.running}
    assert set(sched.cpu.tables if sched.cpu else ()) == {s.seq_id for s in sched.cpu_queue}
    for s in sched.running + sched.cpu_queue:
        pool = sched.cpu if s.place is Place.CPU else sched.gpu
        assert len(pool.table(s.seq_id)) >= pool.blocks_for(s.num_computed)


def build(kind: str, cpu_blocks: int) -> Scheduler:
    gpu = BlockManager(10, BS, Place.GPU, caching=True)
    if kind == "gpu-only":
        return Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4), gpu, cache_salt="m")
    mode, fraction = {"auto": ("auto", 1.0), "auto-small-tier": ("auto", 0.3), "full": ("full", 1.0)}[kind]
    costs = synthetic(cpu_s_per_token=4e-9, block_size=BS)
    if mode == "full":   # a slow GPU prefill, so that CPU-placed prompts decode against their host blocks
        costs = dataclasses.replace(costs, linr_y=[130e-6 + 50e-6 * s for s in costs.linr_x])
    config = SchedulerConfig(offload_mode=mode, max_num_batched_tokens=16, max_num_seqs=4,
                             host_prefix_cache_fraction=fraction)
    return Scheduler(config, gpu, BlockManager(cpu_blocks, BS, Place.CPU), costs, cache_salt="m")


def random_op(rnd) -> tuple:
    """One operation, weighted as a busy replica sees them: admissions and iterations, now and then
    a follow-up turn, an abort, a preemption, a failed iteration or a step scheduled ahead."""
    r = rnd.random()
    if r < 0.3:
        return ("add", rnd.randint(0, 2), rnd.randint(0, 9), rnd.randint(1, 6))
    if r < 0.4:
        return ("followup", rnd.randint(0, 50))
    if r < 0.8:
        return ("step",)
    return (rnd.choice(["ahead", "abort", "recompute", "fail"]), rnd.randint(0, 50))


class World:
    def __init__(self, kind: str, cpu_blocks: int = 24) -> None:
        self.sched = build(kind, cpu_blocks)
        self.shadow = Shadow(self.sched)
        self.seqs: list[Sequence] = []

    def add(self, prompt: list[int], max_tokens: int) -> None:
        s = Sequence(len(self.seqs), f"r{len(self.seqs)}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0),
                     eos_token_ids=(2,), max_model_len=40)
        self.seqs.append(s)
        self.sched.add(s)

    def note(self, out) -> None:
        TALLY["demotions"] += bool(self.sched.host and out.iteration_id in self.sched.host.demoting)
        TALLY["demotions_beside"] += bool(out.demote_pairs)
        TALLY["demotions_at_eviction"] += bool(out.swap_out_pairs and not out.swapped_out)
        TALLY["promotions"] += len(out.swap_in_pairs) > len(out.swapped_in)   # one pair per request swapped in
        TALLY["cpu_direct_steps"] += sum(r.cpu_decode and not r.sample for r in out.rows)
        TALLY["swaps"] += bool(out.swapped_out or out.swapped_in)
        TALLY["preemptions"] += bool(out.preempted)

    def execute(self, out, tables) -> None:
        self.shadow.run(out, tables)
        self.sched.update(out, {r.seq.seq_id: next_token(r.seq) for r in out.rows if r.sample})

    def op(self, op: tuple) -> None:
        sched, live = self.sched, [s for s in self.seqs if not s.is_finished]
        if op[0] == "add":
            self.add(PREFIXES[op[1]] + [400 + op[1] * 10 + j for j in range(op[2])], op[3])
        elif op[0] == "followup":                       # the next turn resends the conversation
            done = [s for s in self.seqs if s.is_finished and s.num_tokens < 30]
            if done:
                prev = done[op[1] % len(done)]
                self.add(prev.token_slice(0, prev.num_tokens) + [7, 8], 3)
        elif op[0] in ("step", "ahead"):
            out = sched.schedule()
            tables = self.shadow.capture(out)
            ahead = sched.schedule_ahead(out) if op[0] == "ahead" else None
            TALLY["ahead_behind_copies"] += ahead is not None and bool(out.swap_out_pairs or out.swap_in_pairs)
            ahead_tables = self.shadow.capture(ahead) if ahead is not None else None
            self.note(out)
            self.execute(out, tables)
            if ahead is not None:
                self.note(ahead)
                self.execute(ahead, ahead_tables)
        elif op[0] == "abort" and live:
            sched.finish(live[op[1] % len(live)], FinishReason.ABORT)
        elif op[0] == "recompute":
            gpu = [s for s in sched.running]
            if gpu:
                sched.recompute(gpu[op[1] % len(gpu)])
        elif op[0] == "fail":                            # the worker ran nothing: the engine ends what it moved
            out = sched.schedule()
            TALLY["failed_with_demotions"] += bool(sched.host and out.iteration_id in sched.host.demoting)
            for s in {id(s): s for s in [r.seq for r in out.rows] + out.swapped_out + out.swapped_in}.values():
                if s.status is SeqStatus.RUNNING:
                    sched.finish(s, FinishReason.ERROR)
        check_books(sched)


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["gpu-only", "auto", "auto-small-tier", "full"]), cpu_blocks=st.sampled_from([8, 24]),
       rnd=st.randoms(use_true_random=False))
def run_random(kind: str, cpu_blocks: int, rnd) -> None:
    world = World(kind, cpu_blocks)
    for _ in range(60):
        world.op(random_op(rnd))
    for _ in range(200):                                 # drain: everything left finishes
        if not world.sched.has_work():
            break
        world.op(("step",))
    for s in world.seqs:
        if not s.is_finished:
            world.sched.finish(s, FinishReason.ABORT)
    sched = world.sched
    if sched.host is not None:
        sched.host.confirm(sched.iteration)
    check_books(sched)
    for pool in (sched.gpu, sched.cpu):
        if pool is not None:
            assert pool.num_free == pool.num_blocks and not any(pool.ref_count), "a block leaked"


def test_block_accounting_and_kv_contents_under_random_operations():
    TALLY.clear()
    run_random()
    # the sequences did reach the paths under test
    for what in ("demotions", "promotions", "cpu_direct_steps", "swaps", "preemptions", "failed_with_demotions",
                 "demotions_beside", "demotions_at_eviction",
                 "ahead_behind_copies"):
        assert TALLY[what] > 0, (what, dict(TALLY))
