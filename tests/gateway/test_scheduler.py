from neo_common.config import SchedulerConfig
from neo_gateway.block_manager import BlockManager
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.scheduler import Scheduler
from neo_gateway.sequence import FinishReason, Sequence, SeqStatus


def seq(i: int, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(i, f"r{i}", list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0),
                    eos_token_ids=(2,), max_model_len=4096)


def run(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    sampled = {r.seq.seq_id: token for r in out.rows if r.sample}
    return out, sched.update(out, sampled)


def test_chunked_prefill_respects_token_budget_then_decodes():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32), BlockManager(64, 16))
    a, b = seq(1, 50), seq(2, 5)
    sched.add(a)
    sched.add(b)
    out, events = run(sched)
    assert [(r.seq.seq_id, r.start, r.num_tokens, r.sample) for r in out.rows] == [(1, 0, 32, False)]
    assert events == []
    out, events = run(sched)
    # a finishes its prompt (18 tokens) and samples; b is admitted with what is left of the budget
    assert [(r.seq.seq_id, r.start, r.num_tokens, r.sample) for r in out.rows] == [(1, 32, 18, True), (2, 0, 5, True)]
    assert [(s.seq_id, t) for s, t, _ in events] == [(1, 7), (2, 7)]
    out, _ = run(sched)
    assert [(r.seq.seq_id, r.start, r.num_tokens) for r in out.rows] == [(1, 50, 1), (2, 5, 1)]
    plan = out.to_plan(sched.gpu)
    assert plan.token_ids.tolist() == [7, 7] and plan.start_pos.tolist() == [50, 5]
    assert (plan.block_tables[0, :4] == sched.gpu.table(1)[:4]).all()


def test_max_num_seqs_limits_admission_fcfs():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(64, 16))
    for i in range(4):
        sched.add(seq(i, 4))
    out, _ = run(sched)
    assert [r.seq.seq_id for r in out.rows] == [0, 1]
    assert sched.num_waiting == 2


def test_finish_on_max_tokens_and_eos_frees_blocks():
    sched = Scheduler(SchedulerConfig(), BlockManager(16, 16))
    s = seq(1, 4, max_tokens=2)
    sched.add(s)
    run(sched)
    _, events = run(sched)
    assert events[-1][2] is FinishReason.LENGTH and s.is_finished and sched.gpu.num_free == 16
    e = seq(2, 4)
    sched.add(e)
    _, events = run(sched, token=2)
    assert events[-1][2] is FinishReason.STOP and sched.gpu.num_free == 16


def test_preemption_by_recompute_keeps_generated_tokens():
    # 4 blocks of 4 tokens; two requests of 7 prompt tokens need 2 blocks each, then a third block.
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager(4, 4))
    a, b = seq(1, 7, max_tokens=6), seq(2, 7, max_tokens=6)
    sched.add(a)
    sched.add(b)
    run(sched)  # both prefilled: 7 tokens each -> 2 blocks each; pool full
    out, _ = run(sched)  # first decode: position 7 still fits the second block
    assert [r.seq.seq_id for r in out.rows] == [1, 2]
    out, _ = run(sched)  # next decode needs a 3rd block each -> the newest (b) is preempted
    assert [r.seq.seq_id for r in out.rows] == [1]
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and len(b.output_ids) == 2
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    while not a.is_finished:
        run(sched)
    # b is re-prefilled with prompt + its output so far, then continues
    out, _ = run(sched)
    row = out.rows[0]
    assert row.seq is b and (row.start, row.num_tokens, row.sample) == (0, 9, True), "prompt + 2 kept tokens"
    while not b.is_finished:
        run(sched)
    assert len(b.output_ids) == 6 and sched.gpu.num_free == 4


def test_abort_while_waiting_and_running_frees_everything():
    sched = Scheduler(SchedulerConfig(max_num_seqs=1), BlockManager(8, 16))
    a, b = seq(1, 20), seq(2, 20)
    sched.add(a)
    sched.add(b)
    run(sched)
    sched.finish(b, FinishReason.ABORT)
    sched.finish(a, FinishReason.ABORT)
    assert not sched.has_work() and sched.gpu.num_free == 8
