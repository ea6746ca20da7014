"""NEO offloading end to end on the CPU twin: greedy outputs with decodes on the CPU are GPU-only's.

Three real replicas per model (gateway, worker on the torch CPU device, cpu_attention process with the
native kernel over the shared segment): GPU-only with a roomy pool; ``full`` (every decode on the
CPU, so every request is prefilled through the staging area and streamed to the host pool); ``auto``
under a GPU KV budget far too small for 64 concurrent requests, which forces CPU-bound admissions,
swap-outs and swap-ins. All three must produce the same text for every request, and leave every
block of both pools free.
"""

from __future__ import annotations

import pytest
import transformers

from support.equivalence import complete_all, fast_host_tables, metrics, model_under_test, value, workload
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
         # Swapping back in until the GPU pool is full (threshold 1.0, no hysteresis band) makes the
         # next GPU request that grows past a block swap another out, however the requests arrived.
         "auto": ["--offload-mode", "auto", "--num-gpu-blocks", "16", "--swap-in-threshold", "1.0",
                 "--calibrate-pipeline", "false"]}


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



@pytest.mark.parametrize("model", ["smollm2", "random-llama3"])
def test_offloaded_greedy_outputs_equal_gpu_only(model, replica_factory, tmp_path, cost_cache, monkeypatch):
    monkeypatch.setenv("NEO_COST_CACHE_DIR", cost_cache)
    args, name = model_under_test(model, lambda: random_llama3(tmp_path))
    requests = workload(num_requests=NUM_REQUESTS)
    texts, stats = {}, {}
    for mode, mode_args in MODES.items():
        if mode == "auto":
            mode_args = [*mode_args, "--cost-tables", fast_host_tables(cost_cache, tmp_path)]
        replica = replica_factory(*COMMON, *args, *mode_args)
        texts[mode] = complete_all(replica.url, name, requests)
        stats[mode] = metrics(replica.url)
        replica.stop()
    for mode in ("full", "auto"):
        diff = [i for i, (a, b) in enumerate(zip(texts["off"], texts[mode])) if a != b]
        assert not diff, f"{mode}: requests {diff} differ, e.g. {texts['off'][diff[0]]!r} vs {texts[mode][diff[0]]!r}"
    for mode, m in stats.items():
        assert value(m, "neo:gpu_kv_blocks_free") == value(m, "neo:gpu_kv_blocks_total"), mode
        assert value(m, "neo:cpu_kv_cache_usage_perc") == 0.0, mode
        assert value(m, "vllm:num_requests_running") == 0.0, mode
    assert value(stats["off"], "neo:cpu_kv_blocks_total") == 0
    full, auto = stats["full"], stats["auto"]
    assert value(full, "neo:iteration_plan_total", plan="pipelined") > 0
    assert value(full, "neo:cpu_attention_wait_seconds_count") > 0, "CPU decodes ran in the cpu_attention process"
    assert value(auto, "neo:swaps_total", direction="out") > 0, "the tiny GPU budget must force swap-outs"
    assert value(auto, "neo:swaps_total", direction="in") > 0
    assert value(auto, "neo:cpu_attention_wait_seconds_count") > 0, "some requests decoded on the CPU"
