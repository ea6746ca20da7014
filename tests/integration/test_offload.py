"""NEO offloading end to end on the CPU twin: greedy outputs with decodes on the CPU are GPU-only's.

Three real replicas per model (gateway, worker on the torch CPU device, cpu_attention process with the
native kernel over the shared segment): GPU-only with a roomy pool; ``full`` (every decode on the
CPU, so every request is prefilled through the staging area and streamed to the host pool); ``auto``
under a GPU KV budget far too small for 64 concurrent requests, which forces CPU-bound admissions,
swap-outs and swap-ins. All three must produce the same text for every request, and leave every
block of both pools free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import os

import httpx
import numpy as np
import pytest
import transformers

from neo_common.model_source import embedded_gguf_path
from neo_gateway.cost_model import CostTables
from support.random_model import random_hf_folder

pytestmark = pytest.mark.integration

NUM_REQUESTS = 64
# A token budget that takes every prompt whole: a chunked prefill would attend through another SDPA
# path than a whole one (a rounding apart), and only GPU-only mode chunks.
COMMON = ["--kv-cache-dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "64",
          "--max-num-batched-tokens", "4096",
          "--num-cpu-blocks", "512", "--cpu-threads", "2"]
MODES = {"off": ["--offload-mode", "off", "--num-gpu-blocks", "512"],
         "full": ["--offload-mode", "full", "--num-gpu-blocks", "64"],
         "auto": ["--offload-mode", "auto", "--num-gpu-blocks", "16"]}


def random_llama3(folder) -> str:
    """A small Llama-3-shaped model (GQA 4:1, head_dim 128, llama3 RoPE scaling) with random weights,
    over the embedded model's vocabulary so the gateway can use its tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=128, max_position_embeddings=2048, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return random_hf_folder(folder, config)


def workload(seed: int = 0) -> list[tuple[list[int], int]]:
    """64 token-id prompts of 3..60 tokens with 4..40 new tokens each: decodes cross block boundaries,
    so GPU requests must grow (and be swapped out). Contexts stay under 128 tokens, so the kernel
    never splits a request across threads: its sums are the same in every batch."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(100, 49000, int(rng.integers(3, 61))).tolist(), int(rng.integers(4, 41)))
            for _ in range(NUM_REQUESTS)]


async def complete_all(url: str, model: str, requests) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(prompt, max_tokens):
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0,
                                                            "max_tokens": max_tokens, "ignore_eos": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["completion_tokens"] == max_tokens
            return body["choices"][0]["text"]
        return await asyncio.gather(*(one(p, n) for p, n in requests))


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("neo:"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def value(m: dict[str, float], name: str, **labels) -> float:
    for key, v in m.items():
        if key.split("{")[0] == name and all(f'{k}="{val}"' in key for k, val in labels.items()):
            return v
    raise KeyError(name)


def fast_host_tables(cost_cache: str, folder) -> str:
    """This machine's profile (written by the ``full`` replica) with CPU attention 1000x cheaper.
    On the CPU twin the "GPU" is this same 2-core host, where the policy rightly sees nothing to
    gain from CPU decoding and, with the admission gate, would keep every request off the host pool;
    a host that is fast relative to the GPU makes ``auto`` place, prefill and decode requests on the
    CPU, which is the path whose outputs this test compares."""
    path = max(glob.glob(os.path.join(cost_cache, "*.json")), key=os.path.getmtime)  # this model's, just profiled
    tables = CostTables.load(path)
    fast = dataclasses.replace(tables, cdec_y=[[v * 1e-3 for v in row] for row in tables.cdec_y])
    return fast.save(str(folder / "fast-host-cost.json"))


@pytest.fixture(scope="module")
def cost_cache(tmp_path_factory):
    """One profile per model for the whole module (the worker profiles at its first start)."""
    return str(tmp_path_factory.mktemp("cost"))


@pytest.mark.parametrize("model", ["smollm2", "random-llama3"])
def test_offloaded_greedy_outputs_equal_gpu_only(model, replica_factory, tmp_path, cost_cache, monkeypatch):
    monkeypatch.setenv("NEO_COST_CACHE_DIR", cost_cache)
    if model == "smollm2":
        args, name = [], "smollm2-135m-instruct"
    else:
        args = ["--model", random_llama3(tmp_path), "--tokenizer", embedded_gguf_path(),
                "--served-model-name", "random-llama3"]
        name = "random-llama3"
    requests = workload()
    texts, stats = {}, {}
    for mode, mode_args in MODES.items():
        if mode == "auto":
            mode_args = [*mode_args, "--cost-tables", fast_host_tables(cost_cache, tmp_path)]
        replica = replica_factory(*COMMON, *args, *mode_args)
        texts[mode] = asyncio.run(complete_all(replica.url, name, requests))
        stats[mode] = metrics(replica.url)
        replica.stop()
    for mode in ("full", "auto"):
        diff = [i for i, (a, b) in enumerate(zip(texts["off"], texts[mode])) if a != b]
        assert not diff, f"{mode}: requests {diff} differ, e.g. {texts['off'][diff[0]]!r} vs {texts[mode][diff[0]]!r}"
    for mode, m in stats.items():
        assert value(m, "neo:gpu_kv_blocks_free") == value(m, "neo:gpu_kv_blocks_total"), mode
        assert value(m, "neo:cpu_kv_cache_usage_perc") == 0.0, mode
        assert value(m, "neo:num_requests_running") == 0.0, mode
    assert value(stats["off"], "neo:cpu_kv_blocks_total") == 0
    full, auto = stats["full"], stats["auto"]
    assert value(full, "neo:iteration_plan_total", plan="pipelined") > 0
    assert value(full, "neo:cpu_attention_wait_seconds_count") > 0, "CPU decodes ran in the cpu_attention process"
    assert value(auto, "neo:swaps_total", direction="out") > 0, "the tiny GPU budget must force swap-outs"
    assert value(auto, "neo:swaps_total", direction="in") > 0
    assert value(auto, "neo:cpu_attention_wait_seconds_count") > 0, "some requests decoded on the CPU"
