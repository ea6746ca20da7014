"""The pipelined forward's captured dense stages, through their CPU twin (the same static buffers
and padding, the boundaries called instead of replayed): a pipelined iteration must compute what the
eager pipeline computes, write the same KV to both pools and nothing else, and fall back to eager
sub-batches larger than every bucket. On a GPU host the same tests replay real graphs."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator

import numpy as np
import pytest
import torch

from neo_common.geometry import lookup
from neo_common.protocol import IterationPlan, Place
from neo_common.segment import SegmentLayout
from neo_gpu_worker import ops
from neo_gpu_worker.host_kv import HostKv
from neo_gpu_worker.loader import build_model
from neo_gpu_worker.model_runner import ModelRunner
from neo_gpu_worker.stage_graphs import StageGraphs, stage_buckets

BS, BLOCKS, HOST_BLOCKS, MAX_LEN, MAX_TOKENS = 16, 64, 32, 256, 24
CUDA = torch.cuda.is_available()
DEVICE, DTYPE = (torch.device("cuda", 0), torch.bfloat16) if CUDA else (torch.device("cpu"), torch.float32)
# KV is bf16 either way (the host pool's dtype); padded and unpadded matmuls may round apart by an
# ulp, which bf16 KV can turn into ~1e-2. Wrong static buffers are off by O(1).
TOL = dict(atol=3e-2, rtol=3e-2)


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    g = dataclasses.replace(lookup("smollm2-135m"), num_layers=3)
    ops.configure("auto", DEVICE)
    host = None
    try:
        model = build_model(g, MAX_LEN, DEVICE, DTYPE)
        model.init_random(0)
        host = HostKv(f"neo-test-stage-graphs-{os.getpid()}",
                      SegmentLayout.for_model(g, HOST_BLOCKS, BS, 16, "bfloat16"))
        stages = StageGraphs(model, MAX_TOKENS, DEVICE)
        with torch.inference_mode():
            stages.capture()   # before the KV pool exists, as the worker does
        r = ModelRunner(model, BLOCKS, BS, DEVICE, torch.bfloat16, host, staging_blocks=8,
                        graph_max_batch=MAX_TOKENS, max_model_len=MAX_LEN, stage_graphs=stages)
        gen = torch.Generator(DEVICE).manual_seed(1)
        r.kv_cache.normal_(generator=gen)  # earlier requests' KV everywhere
        host.k_pool.copy_(torch.randn(host.k_pool.shape).to(torch.bfloat16))
        host.v_pool.copy_(torch.randn(host.v_pool.shape).to(torch.bfloat16))
        yield r
    finally:
        ops.configure("torch", DEVICE)
        if host is not None:
            host.close()


def plan_of(rows: list[tuple[int, int, int, int]], seed: int) -> IterationPlan:
    """Rows of (sub-batch, place, start position, tokens) over disjoint shuffled blocks of their pool;
    every row samples. CPU rows here are CPU-bound prefills (no cpu_attention process needed)."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    need = [-(-(start + tokens) // BS) for _, _, start, tokens in rows]
    free = {Place.GPU: list(rng.permutation(BLOCKS)), Place.CPU: list(rng.permutation(HOST_BLOCKS))}
    tables = np.full((n, max(need)), -1, np.int32)
    for i, ((_, place, _, _), m) in enumerate(zip(rows, need)):
        tables[i, :m] = [free[place].pop() for _ in range(m)]
    num_tokens = np.array([r[3] for r in rows], np.int32)
    return IterationPlan(
        iteration_id=seed, seq_ids=np.arange(n, dtype=np.int64), places=np.array([r[1] for r in rows], np.uint8),
        sub_batch=np.array([r[0] for r in rows], np.uint8), start_pos=np.array([r[2] for r in rows], np.int32),
        num_tokens=num_tokens, token_ids=rng.integers(0, 1000, int(num_tokens.sum())).astype(np.int32),
        block_tables=tables, sample=np.ones(n, np.uint8), temperature=np.zeros(n, np.float32),
        top_p=np.ones(n, np.float32), top_k=np.full(n, -1, np.int32), seeds=np.full(n, -1, np.int64),
        steps=np.zeros(n, np.int32))


G, C = Place.GPU, Place.CPU
# sub-batch 0: two GPU decodes, a GPU prefill chunk and a CPU-bound prompt (22 tokens: bucket 24);
# sub-batch 1: three GPU decodes (bucket 4)
MIXED = [(0, G, 5, 1), (0, G, 40, 1), (0, G, 16, 8), (0, C, 0, 12), (1, G, 17, 1), (1, G, 3, 1), (1, G, 64, 1)]


def state(r: ModelRunner) -> list[torch.Tensor]:
    return [r.kv_cache.clone(), r.host.k_pool.clone(), r.host.v_pool.clone()]


def restore(r: ModelRunner, saved: list[torch.Tensor]) -> None:
    for dst, src in zip((r.kv_cache, r.host.k_pool, r.host.v_pool), saved):
        dst.copy_(src)


def forward(r: ModelRunner, plan: IterationPlan, graphs: bool):
    keep = r.pipeline.graphs
    r.pipeline.graphs = keep if graphs else None
    try:
        hidden, rows = r.pipeline.forward(plan)
    finally:
        r.pipeline.graphs = keep
    if CUDA:
        torch.cuda.synchronize()
    return hidden, rows


@pytest.mark.parametrize("rows", [MIXED, [(1, G, 30, 1), (0, C, 0, 5)], [(0, G, 9, 1)]])
@torch.inference_mode()
def test_captured_stages_compute_what_the_eager_pipeline_computes(runner, rows):
    plan = plan_of(rows, len(rows))
    before = state(runner)
    want, want_rows = forward(runner, plan, graphs=False)
    after_eager = state(runner)
    restore(runner, before)
    got, got_rows = forward(runner, plan, graphs=True)
    assert np.array_equal(got_rows, want_rows)
    torch.testing.assert_close(got.float(), want.float(), **TOL)
    # random KV everywhere else: a write to a wrong block or slot is off by O(1)
    for name, a, b in zip(("GPU pool", "host K", "host V"), state(runner), after_eager):
        torch.testing.assert_close(a.float(), b.float(), **TOL, msg=name)


@torch.inference_mode()
def test_padding_rows_of_an_earlier_larger_iteration_write_nothing(runner):
    forward(runner, plan_of(MIXED, 11), graphs=True)               # sub-batch 0 fills 22 rows of bucket 24
    smaller = plan_of([(0, G, 30, 1), (0, G, 50, 1), (0, C, 0, 17), (1, G, 7, 1)], 12)   # 19 rows, same bucket
    before = state(runner)
    forward(runner, smaller, graphs=True)
    gpu_changed = (runner.kv_cache != before[0]).flatten(3).any(-1).any(0).any(0)     # per block
    touched = {int(b) for i in range(smaller.batch_size) if smaller.places[i] == G
               for b in smaller.block_tables[i] if b >= 0}
    assert set(np.flatnonzero(gpu_changed.cpu().numpy()).tolist()) <= touched
    host_changed = (runner.host.k_pool != before[1]).flatten(2).any(-1).any(0)
    cpu_blocks = {int(b) for b in smaller.block_tables[2] if b >= 0}
    assert set(np.flatnonzero(host_changed.numpy()).tolist()) == cpu_blocks


@torch.inference_mode()
def test_sub_batches_larger_than_every_bucket_run_eagerly(runner, monkeypatch):
    steps = []
    replay = runner.pipeline.graphs.step
    monkeypatch.setattr(runner.pipeline.graphs, "step", lambda j, i: (steps.append((j, i)), replay(j, i)))
    big = plan_of([(0, C, 0, MAX_TOKENS + 1), (1, G, 5, 1)], 13)
    forward(runner, big, graphs=True)
    assert steps == []
    forward(runner, plan_of([(0, C, 0, MAX_TOKENS), (1, G, 5, 1)], 14), graphs=True)
    assert len(steps) == 2 * (len(runner.model.layers) + 1)


def test_buckets_hold_every_size_up_to_the_largest():
    for top in (1, 5, 24, 64, 100, 256, 512):
        b = stage_buckets(top)
        assert b[-1] == top and b == sorted(set(b))
        assert all(next(x for x in b if x >= n) < 2 * n for n in range(1, top + 1))  # padding < 2x


@torch.inference_mode()
def test_the_worker_logs_where_a_pipelined_forwards_host_time_went(runner, monkeypatch, caplog):
    from neo_gpu_worker import pipeline

    monkeypatch.setattr(pipeline, "_LOG_EVERY", 3)
    runner.pipeline.totals = dict.fromkeys(runner.pipeline.totals, 0.0)
    caplog.set_level(logging.INFO, logger="neo_gpu_worker.pipeline")
    forward(runner, plan_of(MIXED, 21), graphs=True)
    forward(runner, plan_of([(0, C, 0, MAX_TOKENS + 1), (1, G, 5, 1)], 22), graphs=True)   # runs eagerly
    ours = lambda: [r.getMessage() for r in caplog.records if r.name == "neo_gpu_worker.pipeline"]  # noqa: E731
    assert not ours()
    forward(runner, plan_of(MIXED, 23), graphs=True)
    (line,) = ours()
    assert "mean of 3 (2 from stage graphs)" in line
    assert all(part in line for part in ("dense", "sends", "KV stream-out", "attention and the rest"))
