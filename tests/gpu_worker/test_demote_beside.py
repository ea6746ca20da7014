"""The prefix cache's demotions beside the forward (``IterationPlan.demote``): the host blocks get
the GPU blocks' KV as it was when the plan was queued, even though the next plan, queued at once
behind it, overwrites those GPU blocks; the plan's own rows are computed as without them. On CUDA
the copies run on the runner's side stream; on the CPU device (CI) in order with the swaps."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from neo_common.geometry import lookup
from neo_common.protocol import IterationPlan
from neo_common.segment import SegmentLayout
from neo_gpu_worker.host_kv import HostKv
from neo_gpu_worker.loader import build_model
from neo_gpu_worker.model_runner import ModelRunner

BS, BLOCKS, HOST_BLOCKS = 16, 48, 32
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", 0) if CUDA else torch.device("cpu")


def prefill(iteration: int, table: list[int], length: int, **extra) -> IterationPlan:
    """One prompt of ``length`` tokens over ``table``."""
    rng = np.random.default_rng(iteration)
    return IterationPlan(
        iteration_id=iteration, seq_ids=np.array([iteration], np.int64), places=np.zeros(1, np.uint8),
        sub_batch=np.zeros(1, np.uint8), start_pos=np.zeros(1, np.int32), num_tokens=np.array([length], np.int32),
        token_ids=rng.integers(3, 500, length).astype(np.int32), block_tables=np.array([table], np.int32),
        sample=np.ones(1, np.uint8), temperature=np.zeros(1, np.float32), top_p=np.ones(1, np.float32),
        top_k=np.full(1, -1, np.int32), seeds=np.full(1, -1, np.int64), steps=np.zeros(1, np.int32), **extra)


@pytest.fixture(scope="module")
def runner():
    g = dataclasses.replace(lookup("smollm2-135m"), num_layers=2)
    model = build_model(g, 512, DEVICE, torch.bfloat16)
    model.init_random(0)
    host = HostKv(f"neo-test-demote-{os.getpid()}", SegmentLayout.for_model(g, HOST_BLOCKS, BS, 8, "bfloat16"))
    try:
        r = ModelRunner(model, BLOCKS, BS, DEVICE, torch.bfloat16, host)
        assert (r.demote_stream is not None) == CUDA
        yield r
        r.close()
    finally:
        host.close()


@torch.inference_mode()
def test_demotions_copy_the_kv_the_next_plan_overwrites(runner):
    runner.kv_cache.normal_(generator=torch.Generator(DEVICE).manual_seed(1))   # earlier requests' KV
    demoted_gpu, demoted_host = list(range(20, 28)), list(range(3, 11))
    want = runner.kv_cache[:, :, demoted_gpu].transpose(-3, -2).cpu()           # [L, 2, n, H, bs, D]

    alone = runner.execute(prefill(1, list(range(0, 8)), 100))
    runner.kv_cache[:, :, demoted_gpu] = want.transpose(-3, -2).to(DEVICE)       # as before that forward
    runs = np.array([[20, 3, 8]], np.int32)
    first = runner.launch(prefill(1, list(range(0, 8)), 100, demote=runs))
    second = runner.launch(prefill(2, demoted_gpu, 128))   # overwrites every demoted GPU block
    got_first, _ = first.finish(), second.finish()

    assert np.array_equal(got_first.token_ids, alone.token_ids), "the demotions changed the plan's own rows"
    for side, pool in enumerate((runner.host.k_pool, runner.host.v_pool)):
        assert torch.equal(pool[:, demoted_host], want[:, side]), "a demoted block holds other KV"
    assert not torch.equal(runner.kv_cache[:, :, demoted_gpu].transpose(-3, -2).cpu(), want), \
        "the second plan did not overwrite the demoted GPU blocks: the test proves nothing"
