"""The sharded model over two real gloo ranks (two processes) computes what the whole model does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neo_common.geometry import lookup
from neo_common.tensor_parallel import Shard
from neo_gpu_worker.attention import AttentionMetadata, PrefillSpan
from neo_gpu_worker.loader import build_model
from neo_gpu_worker.parallel import TensorParallel
from support.ranks import run_gloo_ranks

# SmolLM2's head layout (9 query heads over 3 KV heads: ranks hold 2 and 1) with fewer layers; QKV
# bias on, so bias slices are covered too.
GEOMETRY = dataclasses.replace(lookup("smollm2-135m"), num_layers=3, vocab_size=1024, qkv_bias=True)
TOKENS = [5, 17, 300, 42, 7, 999, 64, 3, 12, 800]


def forward(model) -> torch.Tensor:
    """Final hidden states of a 10-token prompt (one prefill), through the paged KV cache."""
    g = model.geometry
    n = len(TOKENS)
    kv = torch.zeros((g.num_layers, 2, 2, 16, g.num_kv_heads, g.head_dim))
    slots = torch.arange(n)
    meta = AttentionMetadata.for_prefill(slots, PrefillSpan(0, n, 0, slots))
    with torch.inference_mode():
        return model(torch.tensor(TOKENS), torch.arange(n), kv, meta)


def rank_main(rank: int, world: int, init_method: str, out) -> None:
    torch.set_num_threads(1)
    tp = TensorParallel(Shard.of(GEOMETRY, rank, world), torch.device("cpu"))
    tp.init_group(init_method, 120.0)
    try:
        model = build_model(GEOMETRY, 64, torch.device("cpu"), torch.float32, tp)
        model.init_random(7)
        hidden = forward(model)
        sampled = tp.broadcast(torch.tensor([11, 22]) if rank == 0 else torch.empty(2, dtype=torch.int64))
        out.put((rank, model.geometry.num_kv_heads, hidden.numpy(), sampled.tolist()))
    finally:
        tp.close()


@pytest.mark.timeout(180)
def test_two_gloo_ranks_equal_the_whole_model() -> None:
    whole = build_model(GEOMETRY, 64, torch.device("cpu"), torch.float32)
    whole.init_random(7)
    expected = forward(whole)
    results, exitcodes = run_gloo_ranks(rank_main)
    assert [r[1] for r in results] == [2, 1], "KV heads per rank"
    for rank, _, hidden, sampled in results:
        assert sampled == [11, 22], "rank 0's tokens reach every rank"
        # the all-reduce adds the ranks' partial sums in another order than one matmul: rounding only
        torch.testing.assert_close(torch.from_numpy(hidden), expected, rtol=1e-5, atol=1e-5)
    assert exitcodes == [0, 0]
