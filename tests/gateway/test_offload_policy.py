import random

import numpy as np
import pytest

from support.cost_tables import synthetic
from neo_common.block_runs import merge_runs
from neo_gateway.offload_policy import WAIT, BatchCandidate, PlanKind, choose_swap_in, decide, hidden

FAST_CPU = dict(cpu_s_per_token=4e-9)   # a host that hides many CPU decodes behind GPU work


def random_candidate(rng: random.Random) -> BatchCandidate:
    return BatchCandidate(
        prefill_lens=[rng.randint(1, 2048) for _ in range(rng.choice([0, 0, 1, 2, 4]))],
        gpu_decode_lens=[rng.randint(1, 8000) for _ in range(rng.randint(0, 256))],
        cpu_decode_lens=[rng.randint(1, 8000) for _ in range(rng.randint(0, 256))],
    )


def check_stages(d, costs, c):
    """Recompute each stage from the tables and the assignment; the decision must agree."""
    cpu = [(i, n) for i, n in enumerate(c.cpu_decode_lens)]
    for j, st in enumerate(d.stages):
        rows = [n for i, n in cpu if d.cpu_sub_batch[i] == j]
        assert st.cdec == pytest.approx(costs.cdec(len(rows), sum(rows)))
        other = [n for i, n in cpu if d.cpu_sub_batch[i] == 1 - j]
        base = sum(c.prefill_lens) + len(c.gpu_decode_lens)
        assert st.dense_tokens == len(other) + (base if j == 1 else 0)
    assert d.layer_s == pytest.approx(sum(s.stage_s for s in d.stages))


def test_slack_inequality_holds_for_every_pipelined_plan():
    rng = random.Random(1234)
    pipelined = 0
    for trial in range(600):
        costs = synthetic(cpu_s_per_token=rng.choice([4e-9, 10e-9, 40e-9]), lnch=rng.choice([5e-6, 20e-6, 100e-6]))
        c = random_candidate(rng)
        d = decide(c, costs, "auto")
        served = [j for j in d.cpu_sub_batch if j != WAIT]
        assert d.rows == len(c.prefill_lens) + len(c.gpu_decode_lens) + len(served)
        # FCFS: the CPU decodes that run are a prefix of the queue
        assert d.cpu_sub_batch[:len(served)] == tuple(served)
        if d.kind is PlanKind.SEQUENTIAL:
            assert not served and len(d.stages) == 1
            continue
        check_stages(d, costs, c)
        if not (c.prefill_lens or c.gpu_decode_lens):
            continue  # the liveness fallback: nothing on the GPU, CPU decodes run unhidden
        pipelined += 1
        for j, st in enumerate(d.stages):
            assert st.gpu_s >= st.cdec + costs.lnch or st.cdec == 0.0, (trial, j, st)
            assert hidden(st)
        assert d.pipelined_rate > d.sequential_rate
    assert pipelined > 50, "the random batches must exercise the pipelined plan"


def test_pipelined_wins_with_a_fast_cpu_and_sub_batch_one_is_cpu_only():
    costs = synthetic(**FAST_CPU)
    c = BatchCandidate(prefill_lens=[512], gpu_decode_lens=[1000] * 128, cpu_decode_lens=[1000] * 128)
    d = decide(c, costs, "auto")
    assert d.kind is PlanKind.PIPELINED and d.pipelined_rate > d.sequential_rate
    assert len(d.cpu_rows(1)) > 0 and d.stages[1].pref == d.stages[1].gdec == 0.0
    assert d.predicted_forward_s(32) == pytest.approx(32 * d.layer_s)


def test_too_slow_cpu_yields_sequential():
    slow = synthetic(cpu_s_per_token=5e-6, cpu_fixed=500e-6)
    rng = random.Random(7)
    for _ in range(200):
        c = random_candidate(rng)
        if not (c.prefill_lens or c.gpu_decode_lens):
            continue
        d = decide(c, slow, "auto")
        assert d.kind is PlanKind.SEQUENTIAL and all(j == WAIT for j in d.cpu_sub_batch)


def test_mode_off_never_pipelines():
    rng = random.Random(3)
    costs = synthetic(**FAST_CPU)
    for _ in range(200):
        c = random_candidate(rng)
        d = decide(c, costs, "off")
        assert d.kind is PlanKind.SEQUENTIAL and d.cpu_waiting == list(range(len(c.cpu_decode_lens)))


def test_mode_full_puts_every_decode_on_cpu():
    slow = synthetic(cpu_s_per_token=5e-6)
    c = BatchCandidate(prefill_lens=[100], cpu_decode_lens=[300] * 40)
    d = decide(c, slow, "full")
    assert d.kind is PlanKind.PIPELINED and not d.cpu_waiting
    assert d.stages[0].cpu_s > d.stages[0].gpu_s, "unhidden: the stage times show the CPU bottleneck"
    assert d.stages[0].stage_s == pytest.approx(d.stages[0].cpu_s + slow.lnch)


def test_only_cpu_decodes_still_run_in_auto():
    d = decide(BatchCandidate(cpu_decode_lens=[100] * 5), synthetic(), "auto")
    assert d.kind is PlanKind.PIPELINED and not d.cpu_waiting


def test_invalid_mode():
    with pytest.raises(ValueError):
        decide(BatchCandidate(), synthetic(), "sometimes")


def test_swap_in_oldest_first_below_threshold():
    queue = [(7, 4), (8, 4), (9, 8)]
    assert choose_swap_in(queue, gpu_used=80, gpu_total=100, threshold=0.95) == [7, 8]
    assert choose_swap_in(queue, gpu_used=92, gpu_total=100, threshold=0.95) == [], "must stay <= 95% after"
    assert choose_swap_in([(7, 8), (9, 1)], gpu_used=90, gpu_total=100, threshold=0.95) == [], "FCFS"
    assert choose_swap_in(queue, gpu_used=88, gpu_total=100, threshold=0.95) == [7]


def simulate(threshold: float, iterations: int = 600, seed: int = 5) -> list[set[str]]:
    """GPU pool of 100 blocks, requests of 16-token blocks decoding one token per iteration.

    Each request grows a block every 16th iteration (staggered); one finishes every 5th iteration
    and a new one arrives in the CPU queue. Per iteration the scheduler swaps out newest-first when
    the GPU pool overflows, else swaps in under the threshold. Returns the events of each iteration:
    a subset of 'out', 'in', 'done' (a finish freed room, so a swap-in then is no thrash).
    """
    rng = random.Random(seed)
    held = {i: rng.randint(2, 8) for i in range(24)}
    gpu, cpu = list(range(16)), list(range(16, 24))
    actions = []
    for it in range(iterations):
        for s in gpu + cpu:
            if (it + 5 * s) % 16 == 0:
                held[s] += 1
        action = set()
        if it % 5 == 4 and gpu:
            gpu.pop(rng.randrange(len(gpu)))
            new = max(held) + 1
            held[new] = rng.randint(2, 8)
            cpu.append(new)
            action.add("done")
        used = sum(held[s] for s in gpu)
        if used > 100:
            while used > 100:  # newest first, to the front of the CPU queue (as Scheduler._evict does)
                s = gpu.pop()
                used -= held[s]
                cpu.insert(0, s)
                action.add("out")
        else:
            for s in choose_swap_in([(s, held[s]) for s in cpu], used, 100, threshold):
                cpu.remove(s)
                gpu.append(s)
                action.add("in")
        actions.append(action)
    return actions


def flips(actions: list[set[str]]) -> int:
    """Swaps undone the next iteration: in then out, or out then in without a finish freeing room."""
    return sum(("in" in a and "out" in b) or ("out" in a and "in" in b and "done" not in b)
               for a, b in zip(actions, actions[1:]))


def count(actions: list[set[str]], what: str) -> int:
    return sum(what in a for a in actions)


def test_hysteresis_prevents_swap_thrash():
    actions = simulate(threshold=0.95)
    assert count(actions, "in") > 50, "the load must keep the GPU pool near full"
    assert flips(actions) == 0 and count(actions, "out") <= 5
    # the same load without the band (swap in up to 100%) alternates out/in every iteration at times
    naive = simulate(threshold=1.0)
    assert flips(naive) > 10
    assert count(naive, "out") > 20


def test_merge_runs():
    assert merge_runs([], []).shape == (0, 3)
    runs = merge_runs([3, 4, 5, 9, 10, 2], [0, 1, 2, 3, 4, 8])
    assert runs.dtype == np.int32 and runs.tolist() == [[3, 0, 3], [9, 3, 2], [2, 8, 1]]
    # contiguous on one side only is not one copy
    assert merge_runs([1, 2, 3], [5, 7, 8]).tolist() == [[1, 5, 1], [2, 7, 2]]
    # descending runs never merge
    assert merge_runs([5, 4], [1, 2]).tolist() == [[5, 1, 1], [4, 2, 1]]
    with pytest.raises(ValueError):
        merge_runs([1, 2], [1])
    # every block is copied exactly once, in order
    rng = np.random.default_rng(0)
    src = rng.permutation(200)[:64]
    dst = np.arange(64)
    runs = merge_runs(src, dst)
    expanded = [(s + k, d + k) for s, d, n in runs for k in range(n)]
    assert expanded == list(zip(src.tolist(), dst.tolist()))


def test_chunked_prefill_costs_the_causal_area_it_adds():
    costs = synthetic()
    d = decide(BatchCandidate(prefill_lens=[100], prefill_starts=[400]), costs, "auto")
    assert d.stages[0].pref == pytest.approx(costs.pref(500) - costs.pref(400))
    assert d.stages[0].tokens == 100
    with pytest.raises(ValueError):
        BatchCandidate(prefill_lens=[1, 2], prefill_starts=[0])


def test_throughput_mode_runs_unhidden_cpu_decodes_when_that_serves_more_rows():
    # A GPU with little work to hide behind (2 decodes): hiding admits 12 of 60 CPU decodes; running
    # all 60 with the stages waiting for the CPU still serves more rows per second.
    costs = synthetic(cpu_s_per_token=40e-9)
    c = BatchCandidate(gpu_decode_lens=[400, 400], cpu_decode_lens=[400] * 60)
    auto, best = decide(c, costs, "auto"), decide(c, costs, "throughput")
    assert len(auto.cpu_waiting) > 30, "auto hides only some of them"
    assert best.kind is PlanKind.PIPELINED and not best.cpu_waiting and best.rate > 1.2 * auto.rate
    assert not all(hidden(st) for st in best.stages), "the CPU side is exposed: longer stages, more rows"
    # A CPU so slow that even all rows at once do not pay: sequential, as in auto.
    slow = synthetic(cpu_s_per_token=5e-6)
    assert decide(c, slow, "throughput").kind is PlanKind.SEQUENTIAL
    # Nothing but CPU decodes: they run.
    assert not decide(BatchCandidate(cpu_decode_lens=[100] * 4), slow, "throughput").cpu_waiting
