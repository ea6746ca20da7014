"""A family other than Llama through the paths that split a layer: Qwen3 (GQA, q/k norm, explicit
head_dim; random non-unit weights from a Hugging Face folder) under tensor parallelism 2 over two real
gloo ranks, and through the pipelined offload forward (its two sub-batches run ``pre_attn`` and
``post_attn`` apart, around attention over the staging area for CPU-bound prefills), each against
the same model run whole and flat."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from neo_common.model_source import ModelSource, read_geometry
from neo_common.protocol import IterationPlan, Place
from neo_common.tensor_parallel import Shard
from neo_common.segment import SegmentLayout
from neo_gpu_worker.batch import build_sub_batch
from neo_gpu_worker.host_kv import HostKv
from neo_gpu_worker.loader import load_model
from neo_gpu_worker.model_runner import ModelRunner
from neo_gpu_worker.parallel import TensorParallel
from support.equivalence import prefill_hidden
from support.random_model import random_hf_folder
from support.ranks import run_gloo_ranks

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")
TOKENS = [5, 17, 300, 42, 7, 99, 64, 3, 12, 80]
BS = 16


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> str:
    # 6 query heads over 3 KV heads: rank 0 holds 2 KV heads, rank 1 one (an uneven split)
    config = transformers.Qwen3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    return random_hf_folder(tmp_path_factory.mktemp("qwen3"), config)


def prefill(model) -> torch.Tensor:
    return prefill_hidden(model, TOKENS, BS)


def rank_main(folder: str, rank: int, world: int, init_method: str, out) -> None:
    torch.set_num_threads(1)
    source = ModelSource("hf", folder, "qwen3")
    tp = TensorParallel(Shard.of(read_geometry(source), rank, world), CPU)
    tp.init_group(init_method, 120.0)
    try:
        model = load_model(source, 64, CPU, torch.float32, tp=tp)
        out.put((rank, model.geometry.num_kv_heads, prefill(model).numpy()))
    finally:
        tp.close()


@pytest.mark.timeout(180)
def test_qwen3_over_two_gloo_ranks_equals_the_whole_model(qwen3) -> None:
    expected = prefill(load_model(ModelSource("hf", qwen3, "qwen3"), 64, CPU, torch.float32))
    results, exitcodes = run_gloo_ranks(rank_main, qwen3)
    assert [r[1] for r in results] == [2, 1], "KV heads per rank"
    for _, _, hidden in results:
        torch.testing.assert_close(torch.from_numpy(hidden), expected, rtol=1e-5, atol=1e-5)
    assert exitcodes == [0, 0]


def _plan(rows: list[tuple[int, int, int]], tables: list[list[int]]) -> IterationPlan:
    """Prompts from position 0: rows of (sub-batch, place, tokens) over the given block tables."""
    rng = np.random.default_rng(3)
    n = len(rows)
    bt = np.full((n, max(len(t) for t in tables)), -1, np.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = t
    num = np.array([r[2] for r in rows], np.int32)
    return IterationPlan(
        iteration_id=1, seq_ids=np.arange(n, dtype=np.int64), places=np.array([r[1] for r in rows], np.uint8),
        sub_batch=np.array([r[0] for r in rows], np.uint8), start_pos=np.zeros(n, np.int32), num_tokens=num,
        token_ids=rng.integers(3, 500, int(num.sum())).astype(np.int32), block_tables=bt,
        sample=np.ones(n, np.uint8), temperature=np.zeros(n, np.float32), top_p=np.ones(n, np.float32),
        top_k=np.full(n, -1, np.int32), seeds=np.full(n, -1, np.int64), steps=np.zeros(n, np.int32))


@torch.inference_mode()
def test_qwen3_pipelined_forward_equals_the_flat_forward(qwen3) -> None:
    model = load_model(ModelSource("hf", qwen3, "qwen3"), 256, CPU, torch.float32)
    g = model.geometry
    host = HostKv(f"neo-test-qwen3-pipeline-{os.getpid()}", SegmentLayout.for_model(g, 16, BS, 16, "bfloat16"))
    try:
        piped = ModelRunner(model, 32, BS, CPU, torch.bfloat16, host, staging_blocks=8)
        # sub-batch 0: a CPU-bound prompt (staging area, streamed to the host pool) and a GPU prompt;
        # sub-batch 1: two GPU prompts
        rows = [(0, Place.CPU, 20), (0, Place.GPU, 9), (1, Place.GPU, 12), (1, Place.GPU, 5)]
        plan = _plan(rows, [[3, 7], [5], [9], [2]])
        hidden, order = piped.pipeline.forward(plan)
        got = model.compute_logits(hidden)[np.argsort(order)]

        flat = ModelRunner(model, 32, BS, CPU, torch.bfloat16)
        whole = _plan([(0, Place.GPU, r[2]) for r in rows], [[3, 7], [5], [9], [2]])
        sb = build_sub_batch(whole, np.arange(whole.batch_size), BS, CPU, 0)
        want = model.compute_logits(model(sb.input_ids, sb.positions, flat.kv_cache, sb.meta)[sb.last_token])
        streamed = host.k_pool.flatten(2).abs().sum(-1).sum(0) > 0   # per host block
        assert streamed.nonzero().flatten().tolist() == [3, 7], "the CPU-bound prompt's KV reached its host blocks"
    finally:
        host.close()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
