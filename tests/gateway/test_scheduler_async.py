"""Async scheduling (``Scheduler.schedule_ahead``): the next decode step is scheduled before the
current one's tokens are known. Whatever the arrival pattern, every request must get the tokens the
synchronous schedule gives it, and both pools must end empty."""

from __future__ import annotations

import pytest

from neo_common.config import SchedulerConfig
from neo_common.protocol import Place
from neo_gateway.block_manager import BlockManager
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.scheduler import Scheduler
from neo_gateway.sequence import Sequence


def token_for(seq: Sequence, position: int) -> int:
    """A deterministic 'model': the token depends on the request and the position only; 2 is EOS."""
    return 2 if (seq.seq_id * 7 + position) % 23 == 0 else 100 + (seq.seq_id + position) % 50


def run(async_: bool, arrive_every: int, blocks: int = 48) -> tuple[dict, int, Scheduler]:
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256), BlockManager(blocks, 16, Place.GPU))
    seqs = [Sequence(i, f"r{i}", list(range(5, 5 + 10 + 9 * (i % 6))),
                     SamplingParams(max_tokens=8 + (i * 5) % 20), eos_token_ids=(2,), max_model_len=512)
            for i in range(24)]
    added, tick, ahead_runs = 0, 0, 0
    in_flight = []  # sent, results not applied yet (the worker runs them in order)
    while True:
        while added < len(seqs) and added * arrive_every <= tick:
            sched.add(seqs[added])
            added += 1
        tick += 1
        if not in_flight:
            if not sched.has_work():
                if added == len(seqs):
                    break
                continue
            out = sched.schedule()
            if out.is_empty:
                continue
            in_flight.append(out)
        current = in_flight[0]
        if async_ and len(in_flight) == 1:
            ahead = sched.schedule_ahead(current)
            if ahead is not None:
                assert all(r.placeholder and r.num_tokens == 1 for r in ahead.rows)
                ahead_runs += 1
                in_flight.append(ahead)
        in_flight.pop(0)
        # the worker: the token at a row's last position (a placeholder row's token was sampled by
        # the previous iteration for the same request, so its input needs no knowledge here)
        sampled = {r.seq.seq_id: token_for(r.seq, r.start + r.num_tokens) for r in current.rows if r.sample}
        sched.update(current, sampled)
    return {s.request_id: (s.output_ids, s.finish_reason) for s in seqs}, ahead_runs, sched


@pytest.mark.parametrize("arrive_every", [0, 1, 3, 8])
def test_async_schedule_gives_every_request_the_synchronous_tokens(arrive_every):
    want, _, _ = run(False, arrive_every)
    got, ahead_runs, sched = run(True, arrive_every)
    assert got == want
    assert ahead_runs > 0, "steady decoding must have been scheduled ahead"
    assert sched.gpu.num_free == sched.gpu.num_blocks and not sched.running and not sched.waiting


def test_nothing_is_scheduled_ahead_while_requests_wait_or_blocks_run_short():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4), BlockManager(4, 16, Place.GPU))
    sched.add(Sequence(0, "a", list(range(5, 21)), SamplingParams(max_tokens=50), (), 512))  # one full block
    out = sched.schedule()                    # a's prefill; its token goes to position 16: a second block
    sched.add(Sequence(1, "b", list(range(5, 9)), SamplingParams(max_tokens=5), (), 512))
    assert sched.schedule_ahead(out) is None, "a waiting request must be admitted by a full schedule()"
    sched.waiting.clear()
    sched.gpu.allocate(99, 48)                # someone else holds the other three blocks
    assert sched.schedule_ahead(out) is None, "no block for position 16: the caller must preempt"
    sched.gpu.free(99)
    ahead = sched.schedule_ahead(out)
    assert [(r.start, r.placeholder) for r in ahead.rows] == [(16, True)]
    assert len(sched.gpu.table(0)) == 2


def test_a_request_ending_by_length_is_not_scheduled_ahead():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4), BlockManager(8, 16, Place.GPU))
    sched.add(Sequence(0, "a", [5, 6, 7], SamplingParams(max_tokens=2), (), 512))
    sched.add(Sequence(1, "b", [5, 6, 7], SamplingParams(max_tokens=9), (), 512))
    out = sched.schedule()                    # prefill both; each samples its first token
    ahead = sched.schedule_ahead(out)
    assert [r.seq.request_id for r in ahead.rows] == ["a", "b"]    # a's second token is still to come
    sched.update(out, {0: 9, 1: 9})
    again = sched.schedule_ahead(ahead)
    assert [r.seq.request_id for r in again.rows] == ["b"]          # a ends on ahead's token
    assert [r.start for r in again.rows] == [4]
