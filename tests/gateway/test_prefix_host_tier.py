"""The prefix cache's host tier: demotion of evicted GPU blocks, swap-in or recompute of host hits,
CPU-direct decoding of CPU-placed prompts, the host budget, failed iterations, and the cost rules."""

from __future__ import annotations

import dataclasses
import functools

from support.cost_tables import synthetic
from neo_common.config import SchedulerConfig
from neo_common.cost_model import CostTables
from neo_common.protocol import Place
from neo_gateway import prefix_cost
from neo_gateway.block_manager import BlockManager
from neo_gateway.scheduler import Scheduler
from neo_gateway.sequence import FinishReason
from support import prefix_scheduling
from support.prefix_scheduling import BS, SYSTEM, finish, run

seq = functools.partial(prefix_scheduling.seq, max_tokens=2)


def scheduler(gpu: int = 8, cpu: int = 64, mode: str = "auto", costs: CostTables | None = None,
              fraction: float = 1.0) -> Scheduler:
    config = SchedulerConfig(offload_mode=mode, host_prefix_cache_fraction=fraction)
    return Scheduler(config, BlockManager(gpu, BS, Place.GPU, caching=True), BlockManager(cpu, BS, Place.CPU),
                     costs or synthetic(cpu_s_per_token=4e-9), cache_salt="m|bf16")


def demoted_system(sched: Scheduler):
    """SYSTEM computed on the GPU, then pushed out of the GPU pool by an unrelated prompt."""
    a = seq(1, SYSTEM + [1])
    sched.add(a)
    finish(sched, a)
    b = seq(2, list(range(500, 500 + 8 * BS - 4)))    # the whole GPU pool: evicts a's cached blocks
    sched.add(b)
    out = run(sched)
    return a, b, out


def test_an_evicted_cached_gpu_block_is_copied_to_the_host_before_the_forward_that_reuses_it():
    sched = scheduler()
    _, b, out = demoted_system(sched)
    (src, dst), = out.swap_out_pairs
    assert len(src) == 3 and set(src) <= set(sched.gpu.table(2)), "b's new blocks were a's cached ones"
    hashes = sched.hasher.hashes(seq(9, SYSTEM + [1]), 3)
    assert sorted(sched.cpu.cached[h] for h in hashes) == sorted(dst), "cached in the host tier once the iteration ran"
    assert all(sched.cpu.ref_count[blk] == 0 for blk in dst) and set(dst) <= set(sched.cpu.evictable)
    assert sched.host.num_demoted_blocks == 3 and not sched.gpu.cached.keys() & set(hashes)
    plan = out.to_plan(sched.gpu, sched.cpu)
    assert plan.swap_out.tolist() and plan.swap_out[:, 2].sum() == 3, "the copies ride the plan's swap-out runs"


def test_cached_gpu_blocks_next_in_line_for_eviction_are_copied_ahead_beside_the_forward():
    sched = scheduler(gpu=12)   # the lookahead (two token budgets) exceeds the pool: every evictable block is next
    a = seq(1, SYSTEM + [1])
    sched.add(a)
    finish(sched, a)            # a's three full blocks are cached and in no table
    b = seq(2, [700, 701])
    sched.add(b)
    out = run(sched)            # nothing is evicted by b's prefill; a's blocks are copied beside it
    hashes = sched.hasher.hashes(seq(9, SYSTEM + [1]), 3)
    (src, dst), = out.demote_pairs
    assert not out.swap_out_pairs and sorted(src) == sorted(sched.gpu.cached[h] for h in hashes)
    assert not set(src) & set(sched.gpu.table(2)), "a block copied beside the forward is in no table"
    assert sorted(sched.cpu.cached[h] for h in hashes) == sorted(dst), "cached in the host tier once it ran"
    assert out.to_plan(sched.gpu, sched.cpu).demote[:, 2].sum() == 3
    assert not run(sched).demote_pairs, "a block the host tier holds is not copied again"
    c = seq(3, list(range(500, 500 + 12 * BS - 4)))   # the whole pool: evicts a's blocks, whose KV is on the host
    sched.add(c)
    out = run(sched)
    assert not out.swap_out_pairs and not sched.gpu.cached.keys() & set(hashes)
    assert sched.host.num_demoted_blocks == 3 and sorted(sched.cpu.cached[h] for h in hashes) == sorted(dst)


def test_copies_ahead_stop_at_half_the_lookahead_per_iteration():
    sched = scheduler(gpu=5)
    sched.host.lookahead = 4    # two blocks per iteration, while fewer than four blocks are free
    a = seq(1, SYSTEM + [1])
    sched.add(a)
    finish(sched, a)
    b = seq(2, [700, 701])
    sched.add(b)
    counts = [sum(len(src) for src, _ in run(sched).demote_pairs) for _ in range(3)]
    assert counts == [2, 1, 0], counts


def test_a_host_tier_smaller_than_the_lookahead_is_not_refilled_with_copies_ahead_every_iteration():
    """Copies ahead that would evict each other (the tier holds fewer blocks than the lookahead)
    stop once the tier is all copies ahead, instead of copying the same blocks again each time."""
    from neo_gateway.host_tier import HostTier
    from neo_gateway.schedule_output import SchedulerOutput

    gpu, cpu = BlockManager(64, BS, Place.GPU, caching=True), BlockManager(16, BS, Place.CPU)
    tier = HostTier(gpu, cpu, budget=16, lookahead=32)
    gpu.allocate(1, BS * 64)
    for i, block in enumerate(gpu.tables[1]):   # 64 cached blocks that no request holds any more
        gpu.hash_of[block], gpu.cached[bytes([i])] = bytes([i]), block
    gpu.free(1)
    gpu.allocate(2, BS * 8)                      # a running request: 8 blocks taken from the LRU end
    copied = []
    for it in range(1, 6):
        out = SchedulerOutput(it, [], [])
        out.rows.append(None)                    # (a plan with rows: copies ahead ride it)
        tier.flush(out)
        tier.confirm(it)
        copied.append(tier.num_demoted_blocks)
    assert copied[1] == copied[-1] <= 16 + 8 + 8, copied   # 8 demoted at eviction, then at most the tier's 16


def test_a_host_hit_is_swapped_in_and_the_prefill_starts_after_it():
    sched = scheduler()
    _, b, _ = demoted_system(sched)
    finish(sched, b)
    host_blocks = list(sched.cpu.cached.values())
    c = seq(3, SYSTEM + [4, 5])
    sched.add(c)
    out = sched.schedule()
    row = next(r for r in out.rows if r.seq is c)
    assert (row.start, row.num_tokens, c.place) == (3 * BS, 2, Place.GPU)
    (src, dst), = out.swap_in_pairs
    assert sorted(src) == sorted(host_blocks) and dst == sched.gpu.table(3)[:3]
    assert not out.swap_out_pairs or not set(out.swap_out_pairs[0][1]) & set(src), \
        "a host block read by this iteration's swap-in never receives its demotions"
    promoted = list(dst)
    sched.update(out, {3: 7})
    assert sched.cpu.hit_tokens == 3 * BS and sched.gpu.hit_tokens == 0 and sched.host.num_promoted_blocks == 3
    d = seq(4, SYSTEM + [6])
    sched.add(d)
    row = next(r for r in run(sched).rows if r.seq is d)
    assert row.start == 3 * BS and sched.gpu.table(4)[:3] == promoted, \
        "the copies were registered on the GPU once they had run"


def test_host_hits_are_recomputed_when_the_tables_say_copying_costs_more():
    base = synthetic(cpu_s_per_token=4e-9)
    cheap_gpu = dataclasses.replace(base, linr_y=[1e-9] * len(base.linr_x), pref_y=[1e-9] * len(base.pref_x))
    sched = scheduler(costs=cheap_gpu)
    _, b, _ = demoted_system(sched)
    finish(sched, b)
    c = seq(3, SYSTEM + [4, 5])
    sched.add(c)
    out = run(sched)
    assert not out.swap_in_pairs and next(r for r in out.rows if r.seq is c).start == 0


def slow_prefill() -> CostTables:
    """A GPU whose dense work costs 50 us per token and layer: recomputing a prompt outweighs steps."""
    base = synthetic(cpu_s_per_token=4e-9)
    return dataclasses.replace(base, linr_y=[130e-6 + 50e-6 * s for s in base.linr_x])


def test_a_cpu_placed_prompt_decodes_against_its_host_blocks_feeding_the_rest_one_token_per_step():
    sched = scheduler(gpu=64, mode="full", costs=slow_prefill())
    a = seq(1, SYSTEM + [1])
    sched.add(a)
    out = run(sched)
    assert a.place is Place.CPU and next(r for r in out.rows if r.seq is a).start == 0, "full: prefilled for the CPU"
    finish(sched, a)
    assert len(sched.cpu.cached) == 3, "a CPU-resident request's full blocks are cached in the host tier"
    b = seq(2, SYSTEM + [4, 5, 6], max_tokens=1)
    sched.add(b)
    out = run(sched)
    row = next(r for r in out.rows if r.seq is b)
    assert b.place is Place.CPU and sched.cpu.table(2)[:3] == [sched.cpu.cached[h] for h in b.block_hashes[:3]]
    assert (row.start, row.num_tokens, row.sample, row.cpu_decode) == (3 * BS, 1, False, True), "no copy, no prefill"
    assert not out.swap_in_pairs and not out.swap_out_pairs
    steps = [row]
    while not b.is_finished:
        steps += [r for r in run(sched).rows if r.seq is b]
    assert [(r.start, r.sample) for r in steps] == [(48, False), (49, False), (50, True)]
    assert sched.cpu.hit_tokens == 3 * BS


def test_cpu_direct_is_declined_on_an_idle_replica_when_a_prefill_is_cheaper_than_the_extra_steps():
    sched = scheduler(gpu=64, mode="full")
    a = seq(1, SYSTEM + [1])
    sched.add(a)
    finish(sched, a)
    b = seq(2, SYSTEM + list(range(900, 900 + BS - 1)), max_tokens=1)   # 15 tokens after the cached blocks
    sched.add(b)
    row = next(r for r in run(sched).rows if r.seq is b)
    assert (row.start, row.num_tokens) == (0, 3 * BS + BS - 1), "prefilled whole"


def test_the_host_budget_drops_the_least_recently_used_cached_blocks_never_live_ones():
    sched = scheduler(gpu=64, cpu=16, mode="full", fraction=0.25)   # at most 4 cached host blocks
    live = seq(1, list(range(700, 700 + 5 * BS)), max_tokens=50)
    sched.add(live)
    run(sched)
    for i, base in enumerate((1000, 2000)):
        s = seq(10 + i, list(range(base, base + 3 * BS + 1)))
        sched.add(s)
        finish(sched, s)
    assert len(sched.cpu.evictable) == 4, "6 blocks cached, the budget keeps 4"
    newer = sched.hasher.hashes(seq(0, list(range(2000, 2000 + 3 * BS))), 3)
    older = sched.hasher.hashes(seq(0, list(range(1000, 1000 + 3 * BS))), 3)
    assert all(h in sched.cpu.cached for h in newer), "the newest kept"
    assert [h in sched.cpu.cached for h in older] == [True, False, False], "the oldest dropped first, chain tails first"
    assert all(sched.cpu.ref_count[blk] == 1 for blk in sched.cpu.table(1)), "the live request's blocks untouched"
    k = len(sched.cpu.free_blocks) + 2                    # needs two cached blocks: taken like free ones
    big = seq(20, list(range(3000, 3000 + k * BS - 1)))
    sched.add(big)
    run(sched)
    assert big.place is Place.CPU and len(sched.cpu.evictable) == 2 and not live.is_finished


def test_demotions_of_an_iteration_that_failed_are_never_cached():
    sched = scheduler()
    a = seq(1, SYSTEM + [1])
    sched.add(a)
    finish(sched, a)
    b = seq(2, list(range(500, 500 + 8 * BS - 4)))
    sched.add(b)
    failed = sched.schedule()
    assert failed.swap_out_pairs and sched.host.num_pending == 3
    sched.finish(b, FinishReason.ERROR)                      # as the engine ends a failed iteration's rows
    c = seq(3, [5] * 20)
    sched.add(c)
    run(sched)                                               # a later iteration reports: the pending copies are dropped
    assert sched.host.num_pending == 0 and not sched.cpu.cached
    assert sched.cpu.num_free == sched.cpu.num_blocks, "their host blocks are free again"


def test_the_cost_rules():
    costs = synthetic()
    # llama-3-8b, 16-token blocks of bf16 KV: 2 MiB per block, ~0.1 ms over 20 GB/s
    assert prefix_cost.kv_block_bytes(costs) == 2 * 32 * 8 * 128 * 16 * 2
    assert prefix_cost.pcie_gbs(dataclasses.replace(costs, key=dataclasses.replace(costs.key, gpu="emulated t4 on X"))) == 16.0
    assert prefix_cost.swap_in_pays(costs, 0, 64, 64, 64 * 16 + 10, 16), "a long prefix: copy beats recompute"
    assert prefix_cost.swap_in_pays(None, 0, 1, 1, 20, 16)
    assert not prefix_cost.cpu_direct_pays(costs, 1000, 30, step_s=0.02, running=0), "idle: prefill it"
    assert prefix_cost.cpu_direct_pays(costs, 1000, 30, step_s=0.02, running=200), "busy: spare the batch"
    assert prefix_cost.cpu_direct_pays(costs, 1000, 1, step_s=1.0, running=0), "nothing to feed but the last token"


def test_a_full_host_tier_never_demotes_into_the_blocks_a_swap_in_of_the_same_iteration_reads():
    sched = scheduler(cpu=3)                                # the host tier holds exactly a's three blocks
    _, b, _ = demoted_system(sched)
    finish(sched, b)                                        # b's seven full blocks: cached on the GPU
    assert len(sched.cpu.evictable) == 3 and not sched.cpu.free_blocks
    c = seq(3, SYSTEM + [4, 5])
    sched.add(c)
    out = sched.schedule()                                  # promotes a's blocks, evicting b's from the GPU
    (src, _), = out.swap_in_pairs
    demoted_into = {d for _, dst in out.swap_out_pairs for d in dst}
    assert not demoted_into & set(src), "the worker copies swap-outs first: they would overwrite what it swaps in"
    sched.update(out, {3: 7})
    assert sorted(sched.cpu.cached.values()) == sorted(src), "the promoted blocks stay cached in the host tier"
