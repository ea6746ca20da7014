"""Automatic prefix caching in the GPU block manager and the scheduler's admissions."""

from __future__ import annotations

from neo_common.config import SchedulerConfig
from neo_gateway.block_manager import BlockManager
from neo_gateway.scheduler import Scheduler
from support.prefix_scheduling import BS, SYSTEM, finish, run, seq


def caching_scheduler(num_blocks: int = 32, salt: str = "m|bf16", **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, BS, caching=True), cache_salt=salt)


def test_a_second_prompt_with_the_same_prefix_starts_after_the_cached_blocks():
    sched = caching_scheduler()
    a = seq(1, SYSTEM + [1, 2, 3])
    sched.add(a)
    run(sched)                                  # a's prompt computed: its three full blocks registered
    b = seq(2, SYSTEM + [4, 5])
    sched.add(b)
    out = run(sched)
    row = next(r for r in out.rows if r.seq is b)
    assert (row.start, row.num_tokens) == (3 * BS, 2), "b computes only what follows the shared prefix"
    assert sched.gpu.table(2)[:3] == sched.gpu.table(1)[:3], "the prefix blocks are shared, not copied"
    assert sched.gpu.table(2)[3] != sched.gpu.table(1)[3], "the partial last block is each request's own"
    assert sched.gpu.hit_tokens == 3 * BS and sched.gpu.queried_tokens == 6 * BS, "both prompts were looked up"
    assert [sched.gpu.ref_count[blk] for blk in sched.gpu.table(1)[:3]] == [2, 2, 2]


def test_the_last_prompt_token_is_always_computed():
    sched = caching_scheduler()
    a = seq(1, SYSTEM)                           # exactly three blocks
    sched.add(a)
    finish(sched, a)
    b = seq(2, list(SYSTEM))
    sched.add(b)
    out = run(sched)
    row = next(r for r in out.rows if r.seq is b)
    assert (row.start, row.num_tokens, row.sample) == (2 * BS, BS, True), "the last block is recomputed to sample"


def test_a_finished_requests_blocks_stay_cached_until_needed_and_then_are_evicted_last():
    sched = caching_scheduler(num_blocks=8)
    a = seq(1, SYSTEM + [1])
    sched.add(a)
    finish(sched, a)
    assert sched.gpu.num_free == 8 and len(sched.gpu.evictable) == 3, "cached KV kept, yet counted as free"
    b = seq(2, list(range(500, 500 + 6 * BS - 8)))   # needs 6 blocks: the 5 without KV and one cached
    sched.add(b)
    run(sched)
    assert len(sched.gpu.evictable) == 2, "free blocks without KV went first, then one cached block"
    finish(sched, b)
    c = seq(3, SYSTEM + [9])
    sched.add(c)
    out = run(sched)
    row = next(r for r in out.rows if r.seq is c)
    assert row.start == 2 * BS, "the chain's tail was evicted first: its first two blocks still match"


def test_shared_blocks_survive_a_preemption_of_one_holder():
    sched = caching_scheduler(num_blocks=10, max_num_batched_tokens=512)
    a, b = seq(1, SYSTEM + [1], max_tokens=64), seq(2, SYSTEM + [2], max_tokens=64)
    sched.add(a)
    run(sched)
    sched.add(b)
    for _ in range(70):                          # both grow until the pool runs out: b is preempted
        out = run(sched)
        if out.preempted:
            break
    assert out.preempted == [b]
    assert all(sched.gpu.ref_count[blk] == 1 for blk in sched.gpu.table(1)), "b's drop only decremented a's blocks"
    finish(sched, a)


def test_another_salt_or_another_token_never_matches():
    for other in (caching_scheduler(salt="m|fp16"), caching_scheduler()):
        a = seq(1, SYSTEM + [1])
        other.add(a)
        finish(other, a)
    same_salt_other_tokens = caching_scheduler()
    a = seq(1, SYSTEM + [1])
    same_salt_other_tokens.add(a)
    finish(same_salt_other_tokens, a)
    b = seq(2, SYSTEM[:-1] + [999, 5])           # differs in the third block
    same_salt_other_tokens.add(b)
    out = run(same_salt_other_tokens)
    assert next(r for r in out.rows if r.seq is b).start == 2 * BS
    fp16, bf16 = caching_scheduler(salt="m|fp16"), caching_scheduler(salt="m|bf16")
    assert fp16.hasher.hashes(seq(9, SYSTEM), 3) != bf16.hasher.hashes(seq(9, SYSTEM), 3)


def test_prefix_caching_off_computes_every_prompt_whole():
    sched = Scheduler(SchedulerConfig(), BlockManager(32, BS, caching=False))
    for i, tail in enumerate(([1], [2])):
        s = seq(i, SYSTEM + tail)
        sched.add(s)
        out = run(sched)
        assert next(r for r in out.rows if r.seq is s).start == 0
        finish(sched, s)


def test_a_request_that_waits_is_counted_once_when_admitted():
    sched = caching_scheduler(num_blocks=5)
    a = seq(1, SYSTEM + [1], max_tokens=4)               # 4 blocks of 5
    sched.add(a)
    run(sched)
    b = seq(2, SYSTEM + list(range(600, 600 + 2 * BS)))  # shares 3 blocks, needs 2 more: waits for a
    sched.add(b)
    for _ in range(2):
        out = run(sched)
        assert all(r.seq is not b for r in out.rows), "b cannot fit yet"
    finish(sched, a)
    out = run(sched)
    assert next(r for r in out.rows if r.seq is b).start == 3 * BS
    assert sched.gpu.queried_tokens == (3 + 4) * BS and sched.gpu.hit_tokens == 3 * BS, "each admission counted once"
