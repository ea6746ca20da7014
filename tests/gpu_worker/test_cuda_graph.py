"""The CUDA-graph decode path, through its CPU twin (same static buffers and padding, the forward
called instead of replayed): it must compute what the eager path computes and never write KV
outside its rows' slots and the scratch block. The GPU run compares real replays likewise."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import pytest
import torch

from neo_common.geometry import lookup
from neo_common.protocol import PLACEHOLDER_TOKEN, IterationPlan, Place
from neo_gpu_worker import ops
from neo_gpu_worker.batch import build_sub_batch
from neo_gpu_worker.cuda_graph import buckets_for
from neo_gpu_worker.loader import build_model
from neo_gpu_worker.model_runner import ModelRunner

BS, BLOCKS, MAX_LEN = 16, 64, 256
# On a GPU host the same tests capture and replay real graphs over the Triton kernels (bf16).
CUDA = torch.cuda.is_available()
DEVICE, DTYPE = (torch.device("cuda", 0), torch.bfloat16) if CUDA else (torch.device("cpu"), torch.float32)
TOL = dict(atol=3e-2, rtol=3e-2) if CUDA else dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    g = dataclasses.replace(lookup("smollm2-135m"), num_layers=2)
    ops.configure("auto", DEVICE)
    try:
        model = build_model(g, MAX_LEN, DEVICE, DTYPE)
        model.init_random(0)
        r = ModelRunner(model, BLOCKS, BS, DEVICE, DTYPE, graph_max_batch=24, max_model_len=MAX_LEN)
        r.kv_cache.normal_(generator=torch.Generator(DEVICE).manual_seed(1))  # earlier requests' KV everywhere
        yield r
    finally:
        ops.configure("torch", DEVICE)


def decode_plan(ctx: list[int], seed: int) -> IterationPlan:
    """Decode rows with contexts ``ctx`` over disjoint, shuffled blocks."""
    rng = np.random.default_rng(seed)
    n = len(ctx)
    per_row = [-(-(c + 1) // BS) for c in ctx]
    blocks = rng.permutation(BLOCKS)[:sum(per_row)].astype(np.int32)
    tables = np.full((n, max(per_row)), -1, np.int32)
    first = 0
    for i, m in enumerate(per_row):
        tables[i, :m] = blocks[first:first + m]
        first += m
    return IterationPlan(
        iteration_id=seed, seq_ids=np.arange(n, dtype=np.int64), places=np.zeros(n, np.uint8),
        sub_batch=np.zeros(n, np.uint8), start_pos=np.array(ctx, np.int32), num_tokens=np.ones(n, np.int32),
        token_ids=rng.integers(0, 1000, n).astype(np.int32), block_tables=tables, sample=np.ones(n, np.uint8),
        temperature=np.zeros(n, np.float32), top_p=np.ones(n, np.float32), top_k=np.full(n, -1, np.int32),
        seeds=np.full(n, -1, np.int64), steps=np.zeros(n, np.int32))


def eager(runner: ModelRunner, plan: IterationPlan) -> torch.Tensor:
    sb = build_sub_batch(plan, np.arange(plan.batch_size), BS, runner.device, 0)
    return runner.model(sb.input_ids, sb.positions, runner.kv_cache, sb.meta)


def written_slots(plan: IterationPlan) -> np.ndarray:
    pos = plan.start_pos.astype(np.int64)
    return plan.block_tables[np.arange(plan.batch_size), pos // BS].astype(np.int64) * BS + pos % BS


@pytest.mark.parametrize("ctx", [[5], [3, 40, 17], [100, 1, 63, 64, 65, 30, 7, 200, 15, 16, 33, 50, 90]])
@torch.inference_mode()
def test_padded_static_path_equals_eager(runner, ctx):
    plan = decode_plan(ctx, len(ctx))
    assert runner.graphs.can_run(plan) and runner.graphs.bucket(len(ctx)) >= len(ctx)
    before = runner.kv_cache.clone()
    want = eager(runner, plan)
    kv_eager = runner.kv_cache.clone()
    runner.kv_cache.copy_(before)
    got = runner.graphs.run(plan)
    torch.testing.assert_close(got, want, **TOL)
    # KV: the rows' slots as eager wrote them, padding only in the scratch block, nothing else touched
    flat = lambda kv: kv[:, :, :BLOCKS].reshape(kv.shape[0], 2, BLOCKS * BS, -1)  # noqa: E731
    slots = written_slots(plan)
    torch.testing.assert_close(flat(runner.kv_cache)[:, :, slots], flat(kv_eager)[:, :, slots], **TOL)
    keep = np.setdiff1d(np.arange(BLOCKS * BS), slots)
    assert torch.equal(flat(runner.kv_cache)[:, :, keep], flat(before)[:, :, keep])


@torch.inference_mode()
def test_rows_of_an_earlier_larger_batch_do_not_write_again(runner):
    runner.graphs.run(decode_plan([20 + i for i in range(12)], 7))  # bucket 16, rows 0..11 filled
    smaller = decode_plan([30, 31, 32, 33, 34, 35, 36, 37, 38], 8)  # same bucket, 9 rows
    before = runner.kv_cache.clone()
    runner.graphs.run(smaller)
    changed = (runner.kv_cache != before).flatten(3).any(-1)     # [layers, 2, blocks]
    blocks = set(np.flatnonzero(changed.any(0).any(0).cpu().numpy()).tolist())
    assert blocks <= set((written_slots(smaller) // BS).tolist()) | {BLOCKS}


@torch.inference_mode()
def test_execute_takes_the_graph_path_for_decodes_only(runner, monkeypatch):
    calls = []
    monkeypatch.setattr(runner.graphs, "run", lambda plan, fill=None: calls.append(plan.batch_size) or eager(runner, plan))
    runner.execute(decode_plan([10, 20], 3))
    prefill = decode_plan([0], 4)
    prefill.num_tokens, prefill.token_ids = np.array([8], np.int32), np.arange(8, dtype=np.int32)
    runner.execute(prefill)
    too_big = decode_plan([4] * 25, 5)
    runner.execute(too_big)
    assert calls == [2]
    offloaded = decode_plan([10, 20], 6)
    offloaded.places = np.array([Place.GPU, Place.CPU], np.uint8)
    assert not runner.graphs.can_run(offloaded)


def test_buckets_cover_every_batch_and_every_power_of_two():
    for top in (1, 3, 16, 100, 256):
        b = buckets_for(top)
        assert b[-1] == top and b == sorted(set(b))
        assert all(p in b for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= top)


@pytest.mark.parametrize("rows", [3, 25])  # the graph path (twin on the CPU) and the eager path
@torch.inference_mode()
def test_placeholder_tokens_are_fed_from_the_last_sample_on_the_device(runner, rows):
    first = decode_plan([10 + i % 4 for i in range(rows)], 11)   # one block each, room for one more token
    sampled = runner.execute(first)
    follow = decode_plan([11 + i % 4 for i in range(rows)], 11)  # same requests, blocks and seq ids, one on
    follow.block_tables = first.block_tables
    follow.token_ids = np.full(rows, PLACEHOLDER_TOKEN, np.int32)
    via_placeholders = runner.execute(follow).token_ids
    follow.token_ids = sampled.token_ids.astype(np.int32)     # what async scheduling stood in for
    assert np.array_equal(runner.execute(follow).token_ids, via_placeholders)


@pytest.mark.parametrize("rows", [3, 25])
@torch.inference_mode()
def test_a_plan_launched_behind_the_last_one_feeds_on_its_device_tokens(runner, rows):
    """The worker launches plan i+1 before it waits for plan i (on the CPU device, both queue on the
    runner's CPU thread); on CUDA, launching must not wait for the device at all."""
    first = decode_plan([10 + i % 4 for i in range(rows)], 15)
    follow = decode_plan([11 + i % 4 for i in range(rows)], 15)
    follow.block_tables = first.block_tables
    follow.token_ids = np.full(rows, PLACEHOLDER_TOKEN, np.int32)
    runner.execute(first)   # warm: compiled kernels, cached allocations (rewrites the same KV)
    if CUDA:
        torch.cuda.set_sync_debug_mode("error")
    try:
        launched = runner.launch(first), runner.launch(follow)
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode(0)
    sampled, via_placeholders = (x.finish() for x in launched)
    assert sampled.total_s >= sampled.forward_s > 0 and via_placeholders.total_s > 0
    follow.token_ids = sampled.token_ids.astype(np.int32)
    assert np.array_equal(runner.execute(follow).token_ids, via_placeholders.token_ids)


@pytest.mark.skipif(not CUDA, reason="copies from pinned memory are asynchronous on CUDA only")
@torch.inference_mode()
def test_a_plan_launched_behind_a_busy_device_never_rewrites_inputs_still_queued(runner):
    """At the largest bucket the graph inputs are copied straight from the pinned staging buffers:
    a plan launched while the device is still busy must not rewrite them under the queued copy."""
    rows = runner.graphs.max_batch
    first = decode_plan([10 + i % 4 for i in range(rows)], 16)
    second = decode_plan([11 + i % 4 for i in range(rows)], 17)   # other tokens, the same blocks
    second.block_tables = first.block_tables
    want = [runner.execute(first).token_ids, runner.execute(second).token_ids]
    torch.cuda._sleep(50_000_000)   # tens of ms of device work ahead of both launches
    launched = runner.launch(first), runner.launch(second)
    got = [x.finish().token_ids for x in launched]
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


@torch.inference_mode()
def test_placeholders_need_a_previous_sample_of_those_requests(runner):
    runner.execute(decode_plan([20, 30], 12))
    bad = decode_plan([21, 31], 13)
    bad.seq_ids = np.array([0, 77], np.int64)
    bad.token_ids = np.full(2, PLACEHOLDER_TOKEN, np.int32)
    with pytest.raises(ValueError, match="77"):
        runner.execute(bad)
    with pytest.raises(ValueError, match="sampled nothing"):  # a failed iteration leaves nothing to feed
        runner.execute(bad)


@torch.inference_mode()
def test_a_position_beyond_its_block_table_is_refused_before_anything_runs(runner):
    plan = decode_plan([10, 20], 14)
    plan.start_pos = np.array([16, 20], np.int32)  # row 0 holds one block: position 16 has none
    with pytest.raises(ValueError, match="beyond its block table"):
        runner.graphs.run(plan)
