"""The Scheduler with a host pool and synthetic cost tables: placement, swaps, hysteresis, plans."""

import random

from support.cost_tables import synthetic
from neo_common.config import SchedulerConfig
from neo_common.protocol import Place
from neo_gateway.block_manager import BlockManager
from neo_gateway.offload_policy import PlanKind, hidden
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.scheduler import Scheduler
from neo_gateway.sequence import FinishReason, Sequence

FAST_CPU = dict(cpu_s_per_token=4e-9)


def seq(i: int, prompt_len: int, max_tokens: int = 64) -> Sequence:
    return Sequence(i, f"r{i}", list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0),
                    eos_token_ids=(), max_model_len=100_000)


def scheduler(mode="auto", gpu=64, cpu=1024, threshold=0.95, costs=None, **cfg) -> Scheduler:
    config = SchedulerConfig(offload_mode=mode, swap_in_threshold=threshold, **cfg)
    return Scheduler(config, BlockManager(gpu, 16, Place.GPU), BlockManager(cpu, 16, Place.CPU),
                     costs or synthetic(**FAST_CPU))


def step(s: Scheduler):
    out = s.schedule()
    s.update(out, {r.seq.seq_id: 7 for r in out.rows if r.sample})
    return out


def test_placement_gpu_first_then_the_round_follows_to_the_cpu(monkeypatch):
    s = scheduler(gpu=10)
    monkeypatch.setattr(s, "_cpu_pays", lambda seq, front=False: True)  # the round logic alone; the gate is tested below
    for i, n in enumerate([64, 64, 100, 16]):      # 4 + 4 blocks fit; the third does not; the 4th follows it
        s.add(seq(i, n))
    out = s.schedule()
    assert [(r.seq.seq_id, r.seq.place) for r in out.rows] == [(0, Place.GPU), (1, Place.GPU), (2, Place.CPU),
                                                                (3, Place.CPU)]
    assert s.cpu.tables[2] and s.cpu.tables[3] and 2 not in s.gpu.tables
    plan = out.to_plan(s.gpu, s.cpu)
    assert plan.places.tolist() == [0, 0, 1, 1]
    assert plan.block_tables[2, :7].tolist() == s.cpu.table(2)[:7], "CPU rows index the CPU pool"


def test_admissions_that_fit_the_gpu_never_ask_the_policy_about_the_cpu(monkeypatch):
    # the policy's look at a round costs the gateway ~0.1-0.4 ms: paid per admission, it slowed
    # every iteration of an offload mode that never offloaded (paper workload a: 0.97x of GPU-only)
    s = scheduler(gpu=10)
    asked = []
    monkeypatch.setattr(s, "_cpu_pays", lambda seq, front=False: asked.append(seq.seq_id) or False)
    for i, n in enumerate([64, 64, 100]):   # 4 + 4 blocks fit; the third does not
        s.add(seq(i, n))
    out = s.schedule()
    assert [r.seq.seq_id for r in out.rows] == [0, 1] and asked == [2]


def test_a_request_the_policy_would_never_decode_on_the_cpu_waits_instead_of_parking_there():
    # Two short GPU decodes: pipelining (weights read twice) never beats the sequential plan, so a
    # CPU-resident request would sit there unserved; waiting, it takes the GPU's next free blocks.
    s = scheduler(gpu=10)
    for i, n in enumerate([64, 64, 100]):
        s.add(seq(i, n))
    out = s.schedule()
    assert [(r.seq.seq_id, r.seq.place) for r in out.rows] == [(0, Place.GPU), (1, Place.GPU)]
    assert [q.seq_id for q in s.waiting] == [2] and not s.cpu_queue
    full = scheduler(mode="full", gpu=10)
    for i, n in enumerate([64, 64, 100]):
        full.add(seq(i, n))
    assert [r.seq.place for r in full.schedule().rows] == [Place.CPU] * 3, "full mode parks regardless"


def test_prompt_longer_than_the_budget_is_not_cpu_bound():
    s = scheduler(gpu=3, max_num_batched_tokens=64)
    s.add(seq(0, 200))
    out = s.schedule()
    assert out.rows == [], "a chunked prompt cannot prefill on the CPU, and the GPU lacks room: it waits"
    s = scheduler(mode="full", gpu=64, max_num_batched_tokens=64)
    s.add(seq(0, 200))
    assert [(r.seq.place, r.num_tokens) for r in s.schedule().rows] == [(Place.GPU, 64)], \
        "full mode prefills a long prompt on the GPU in chunks"


def full_gpu(cpu: int = 64, **kw) -> Scheduler:
    """Three requests of 2 blocks each admitted to a 6-block GPU pool: full, and each decode's next
    token needs a 3rd block, so the next ``schedule`` must evict one (the newest, request 2)."""
    s = scheduler(gpu=6, cpu=cpu, **kw)
    for i in range(3):
        s.add(seq(i, 32))
    step(s)
    return s


def test_swap_out_newest_decode_to_the_front_of_the_cpu_queue():
    s = full_gpu()
    s.cpu_queue.append(seq(99, 16))  # a request already on the CPU (its place in the queue matters)
    s.cpu_queue[-1].place = Place.CPU
    s.cpu.allocate(99, 16)
    out = s.schedule()          # the decodes need a 3rd block each: the newest leaves so the others fit
    assert [v.seq_id for v in out.swapped_out] == [2]
    assert [q.seq_id for q in s.cpu_queue] == [2, 99], "a swapped-out request goes to the front of the queue"
    assert out.swap_out_pairs == [(s.gpu.table(0)[:0] or out.swap_out_pairs[0][0], s.cpu.table(2)[:2])]
    plan = out.to_plan(s.gpu, s.cpu)
    assert plan.swap_out[:, 2].sum() == 2
    assert [r.seq.seq_id for r in out.rows if r.seq.place is Place.GPU] == [0, 1]
    assert {r.seq.seq_id for r in out.cpu_rows} <= {2, 99}
    assert 2 not in s.gpu.tables


def test_a_victim_the_policy_would_not_decode_on_the_cpu_is_recomputed_not_swapped():
    # Two short GPU decodes and nothing else: the policy would never run the victim on the CPU
    # (see the admission test above), so parking it there would hold it back; it is preempted.
    s = full_gpu()
    out = s.schedule()
    assert [v.seq_id for v in out.preempted] == [2] and not out.swapped_out and not s.cpu_queue
    assert s.waiting[0].seq_id == 2 and s.waiting[0].num_computed == 0
    # The same pool with a CPU the policy uses: swapped out, as before.
    fast = full_gpu()
    fast._cpu_pays = lambda victim, front=False: victim.seq_id == 2
    out = fast.schedule()
    assert [v.seq_id for v in out.swapped_out] == [2] and not out.preempted


def test_recompute_when_the_cpu_pool_is_full_too():
    s = full_gpu(cpu=1)
    out = s.schedule()
    assert out.preempted and not out.swapped_out


def test_swap_in_oldest_first_below_the_threshold(monkeypatch):
    s = full_gpu(threshold=0.9)
    monkeypatch.setattr(s, "_cpu_pays", lambda seq, front=False: True)  # the swap mechanics alone; the gate is tested below
    step(s)                                        # swaps out 2 (see above)
    assert [q.seq_id for q in s.cpu_queue] == [2]
    for q in list(s.running):                      # the GPU empties
        s.finish(q, FinishReason.ABORT)
    held = s.cpu.blocks_for(s.cpu_queue[0].num_computed)
    out = s.schedule()
    assert [q.seq_id for q in out.swapped_in] == [2] and not s.cpu_queue and not s.cpu.tables
    assert [r.seq.seq_id for r in out.rows if r.seq.place is Place.GPU] == [2]
    assert out.to_plan(s.gpu, s.cpu).swap_in[:, 2].sum() == held, "its blocks come back with the KV they hold"
    assert s.gpu.num_blocks - s.gpu.num_free <= 0.9 * 6


def run_load(threshold: float, iterations: int = 400, seed: int = 3) -> tuple[list[set], Scheduler]:
    """40 requests decode until max_tokens under a GPU pool too small for all of them (new ones keep
    arriving as others finish)."""
    rng = random.Random(seed)
    s = scheduler(gpu=160, cpu=4096, threshold=threshold, costs=synthetic(**FAST_CPU))
    s._cpu_pays = lambda seq, front=False: True  # swap mechanics under load; the gate is tested above
    next_id = 0
    events = []
    for _ in range(iterations):
        while s.num_running + s.num_waiting < 40:
            s.add(seq(next_id, rng.randint(8, 40), max_tokens=rng.randint(20, 120)))
            next_id += 1
        finished_before = next_id - s.num_running - s.num_waiting
        out = step(s)
        done = next_id - s.num_running - s.num_waiting > finished_before
        events.append({name for name, happened in (("out", out.swapped_out), ("in", out.swapped_in), ("done", done))
                       if happened})
    return events, s


def flips(events) -> int:
    """Swaps undone right away: in then out, or out then in with no finish freeing room between."""
    return sum(("in" in a and "out" in b) or ("out" in a and "in" in b and "done" not in a | b)
               for a, b in zip(events, events[1:]))


def test_hysteresis_prevents_swap_thrash():
    events, s = run_load(0.95)
    assert sum("out" in e for e in events) > 5 and sum("in" in e for e in events) > 5, "the load must swap"
    naive, _ = run_load(1.0)
    assert flips(events) < flips(naive), (flips(events), flips(naive))
    assert flips(events) <= 2 and flips(naive) > 20, (flips(events), flips(naive))


def test_every_pipelined_plan_hides_its_cpu_attention():
    rng = random.Random(0)
    for trial in range(20):
        s = scheduler(gpu=rng.choice([8, 32, 128]), cpu=8192, max_num_seqs=256,
                      costs=synthetic(cpu_s_per_token=rng.choice([4e-9, 20e-9, 40e-9])))
        for i in range(rng.randint(8, 120)):
            s.add(seq(i, rng.randint(16, 900), max_tokens=rng.randint(4, 64)))
        pipelined = 0
        for _ in range(60):
            out = step(s)
            d = out.decision
            assert d is not None
            if d.kind == PlanKind.PIPELINED:
                pipelined += 1
                assert all(hidden(st) for st in d.stages) or not any(r.seq.place is Place.GPU for r in out.rows), \
                    "auto mode runs unhidden CPU work only when nothing else could run"
                assert {r.sub_batch for r in out.cpu_rows} <= {0, 1}
            else:
                assert not out.cpu_rows, "a sequential plan leaves the CPU decodes waiting"
        assert s.gpu.num_free + sum(len(t) for t in s.gpu.tables.values()) == s.gpu.num_blocks


def test_a_too_slow_cpu_yields_sequential_plans():
    s = scheduler(gpu=24, cpu=4096, costs=synthetic(cpu_s_per_token=5e-6))
    for i in range(40):
        s.add(seq(i, 64, max_tokens=30))
    kinds = []
    for _ in range(20):
        out = step(s)
        if any(r.seq.place is Place.GPU for r in out.rows):
            kinds.append(out.decision.kind)
    assert kinds and all(k == PlanKind.SEQUENTIAL for k in kinds)
    assert not s.cpu_queue and s.num_preemptions, \
        "a CPU the policy never decodes on gets no requests: victims are recomputed, newcomers wait for the GPU"


def test_full_mode_decodes_everything_on_the_cpu_and_frees_both_pools():
    s = scheduler(mode="full", gpu=64, cpu=512)
    for i in range(10):
        s.add(seq(i, 20, max_tokens=5))
    for _ in range(40):
        out = s.schedule()
        cpu_plan = out.to_cpu_plan(s.cpu)
        s.update(out, {r.seq.seq_id: 7 for r in out.rows if r.sample})
        assert all(r.seq.place is Place.CPU for r in out.rows if r.num_tokens == 1 and r.start > 0)
        if out.cpu_rows:
            assert sum(len(x) for x in cpu_plan.seq_ids) == len(out.cpu_rows)
            for j in (0, 1):
                rows = [r for r in out.cpu_rows if r.sub_batch == j]
                assert cpu_plan.seq_lens[j].tolist() == [r.start + 1 for r in rows]
        if not s.has_work():
            break
    assert not s.has_work()
    assert s.gpu.num_free == 64 and s.cpu.num_free == 512


def test_measured_pipeline_overhead_turns_a_losing_pipeline_off():
    """The tables say pipelining pays; the measured forwards say each stage costs far more than they
    predict. After a few such iterations the policy plans sequentially and stops sending new requests
    to the host pool; forwards as fast as predicted leave it pipelining."""
    def run(slowdown: float):
        s = scheduler(gpu=24, cpu=4096, max_num_seqs=256)
        layers = int(dict(s.costs.key.shapes)["num_layers"])
        for i in range(40):
            s.add(seq(i, 64, max_tokens=200))
        kinds = []
        for _ in range(30):
            out = s.schedule()
            s.update(out, {r.seq.seq_id: 7 for r in out.rows if r.sample})
            if out.decision is not None:
                kinds.append(out.decision.kind)
                s.observe(out, out.decision.predicted_forward_s(layers) * slowdown)
        return s, kinds

    honest, kinds = run(1.0)
    assert kinds[-1] == PlanKind.PIPELINED and honest.calibration.overhead_s == 0.0
    slow, kinds = run(20.0)
    assert PlanKind.PIPELINED in kinds, "it pipelined while the tables were trusted"
    assert slow.calibration.overhead_s > 0 and kinds[-5:] == [PlanKind.SEQUENTIAL] * 5
    newcomer = seq(999, 64)
    assert not slow._cpu_pays(newcomer) and honest._cpu_pays(newcomer)


def test_cpu_decodes_that_each_need_a_new_block_are_run_only_as_far_as_the_host_pool_holds_them_all():
    s = scheduler(mode="full", cpu=3)
    a, b = seq(1, 16, max_tokens=4), seq(2, 16, max_tokens=4)   # one block each; each decode then needs a second
    s.add(a)
    s.add(b)
    step(s)
    assert a.place is b.place is Place.CPU and s.cpu.num_free == 1
    out = step(s)                                               # one new block left: one of them decodes, one waits
    assert [r.seq for r in out.rows if r.cpu_decode] == [a]
