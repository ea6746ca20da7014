"""Tensor parallelism end to end on the CPU twin: two worker ranks over gloo give TP=1's outputs.

Real replicas per model. Float32 compute everywhere; what differs is where sums happen: TP=2 adds
the ranks' partial O-projection and MLP outputs in an all-reduce, TP=1 inside one matmul, so the
residual streams differ by float32 rounding (~1e-7). With a float32 KV cache that leaves greedy
tokens alone, so ``tp1`` and ``tp2`` (GPU-only, float32 KV) must agree exactly. A 16-bit KV cache,
which offloading needs, rounds those tiny differences to bf16 steps (~0.4%) wherever a value sits
near a rounding boundary, enough to flip a near-tie between two tokens (a random-token prompt has
them: one here has a top-2 logit gap of 0.004), so the offloading runs are compared with TP=2
GPU-only on the same bf16 KV (``tp2-bf16``), as ``test_offload`` compares them at TP=1:

- ``tp2-full``: every decode on the CPU: two cpu_attention processes, each serving its rank's KV
  heads from its own segment;
- ``tp2-auto``: a GPU KV budget too small for the workload: CPU-bound prefills, swaps of each
  rank's heads, pipelined iterations. A first wave of requests fills its 16 GPU blocks before the
  rest arrive, so their growth evicts (swaps out) one of them however the rest arrive (without it,
  a run made 2 swap-outs or, once, none).

SmolLM2 has 3 KV heads, so its ranks hold 2 and 1: the uneven split is exercised too. Every
request's text must match, and both pools must be free afterwards.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal

import httpx
import pytest
import transformers

from neo_common.procs import descendants
from support.equivalence import (complete_all, fast_host_tables, filling_wave, metrics, model_under_test, value,
                                 workload)
from support.random_model import random_hf_folder
from support.replica import http_status, pid_alive, wait_until

pytestmark = pytest.mark.integration

NUM_REQUESTS = 32
# Whole prompts in one chunk (test_offload says why).
COMMON = ["--max-model-len", "512", "--max-num-seqs", "64", "--max-num-batched-tokens", "4096",
          "--num-cpu-blocks", "512", "--cpu-threads", "2"]
TP2 = ["--tensor-parallel-size", "2"]
BF16 = ["--kv-cache-dtype", "bfloat16"]
RUNS = {"tp1": ["--kv-cache-dtype", "float32", "--offload-mode", "off", "--num-gpu-blocks", "512"],
        "tp2": [*TP2, "--kv-cache-dtype", "float32", "--offload-mode", "off", "--num-gpu-blocks", "512"],
        "tp2-bf16": [*TP2, *BF16, "--offload-mode", "off", "--num-gpu-blocks", "512"],
        "tp2-full": [*TP2, *BF16, "--offload-mode", "full", "--num-gpu-blocks", "64"],
        "tp2-auto": [*TP2, *BF16, "--offload-mode", "auto", "--num-gpu-blocks", "16", "--swap-in-threshold", "1.0",
                     "--calibrate-pipeline", "false"]}
EQUAL = {"tp2": "tp1", "tp2-full": "tp2-bf16", "tp2-auto": "tp2-bf16"}
CONSTRAINED = ("tp1", "tp2")   # GPU-only runs: constrained rows launched ahead, their masks deferred


def complete_constrained(url: str, model: str) -> list[str]:
    """Four concurrent greedy requests under a regex they cannot finish: every one ends by length
    and writes letters only."""
    def one(i: int) -> str:
        r = httpx.post(url + "/v1/completions", timeout=300, json={
            "model": model, "prompt": f"Item {i}:", "max_tokens": 24, "temperature": 0,
            "guided_regex": "[a-z]{400}"})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and choice["text"].isalpha(), choice
        return choice["text"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(4)))


def random_gqa_llama(folder) -> str:
    """A small Llama-shaped model with 2 KV heads (GQA 4:1), random weights, the embedded vocabulary."""
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rope_theta=500000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return random_hf_folder(folder, config)



@pytest.mark.parametrize("model", ["smollm2", "random-gqa"])
def test_tp2_greedy_outputs_equal_tp1(model, replica_factory, tmp_path, cost_cache, monkeypatch):
    monkeypatch.setenv("NEO_COST_CACHE_DIR", cost_cache)
    args, name = model_under_test(model, lambda: random_gqa_llama(tmp_path))
    # a wave that fills tp2-auto's 16 GPU blocks goes first: its growth must swap some of it out
    wave = filling_wave(16)
    requests = wave + workload(seed=1, num_requests=NUM_REQUESTS)
    texts, stats, constrained = {}, {}, {}
    for run, run_args in RUNS.items():
        if run == "tp2-auto":
            run_args = [*run_args, "--cost-tables", fast_host_tables(cost_cache, tmp_path)]
        replica = replica_factory(*COMMON, *args, *run_args)
        if run.startswith("tp2"):  # rank 1 runs in a child of each data-plane role
            assert len(rank_children(replica, b"gpu-worker")) == 1, run
            assert len(rank_children(replica, b"cpu-attention")) == (run in ("tp2-full", "tp2-auto")), run
        texts[run] = complete_all(replica.url, name, requests, first=len(wave))
        if run in CONSTRAINED:
            constrained[run] = complete_constrained(replica.url, name)
        stats[run] = metrics(replica.url)
        replica.stop()
    for run, ref in EQUAL.items():
        diff = [i for i, (a, b) in enumerate(zip(texts[ref], texts[run])) if a != b]
        assert not diff, f"{run} vs {ref}: requests {diff} differ, e.g. {texts[ref][diff[0]]!r} vs {texts[run][diff[0]]!r}"
    assert constrained["tp2"] == constrained["tp1"], "grammar-constrained rows (masks sent to rank 0 alone)"
    for run, m in stats.items():
        assert value(m, "neo:gpu_kv_blocks_free") == value(m, "neo:gpu_kv_blocks_total"), run
        assert value(m, "vllm:num_requests_running") == 0.0, run
    for run in ("tp2-full", "tp2-auto"):
        assert value(stats[run], "neo:cpu_kv_cache_usage_perc") == 0.0, run
        assert value(stats[run], "neo:cpu_attention_up") == 1.0, run
        assert value(stats[run], "neo:cpu_attention_wait_seconds_count") > 0, f"{run}: CPU decodes ran"
    assert value(stats["tp2-auto"], "neo:swaps_total", direction="out") > 0
    assert value(stats["tp2-auto"], "neo:swaps_total", direction="in") > 0


def worker_pid(replica) -> int | None:
    """The GPU worker's PID while /health says every process is up, else None."""
    body = httpx.get(replica.url + "/health", timeout=10).json()
    return body["workers"]["gpu_worker"]["pid"] if "workers" in body else None


def rank_children(replica, role: bytes) -> list[int]:
    """PIDs of the processes the replica's ``role`` process started (its tensor-parallel ranks)."""
    roles = [p for p in descendants(replica.proc.pid) if role in _cmdline(p).split(b"\0")]
    assert len(roles) <= 1, roles
    return [p for r in roles for p in descendants(r) if b"spawn_main" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_a_dead_rank_restarts_the_worker_and_its_segments(replica_factory):
    """Rank 1 of the worker dies (SIGKILL): rank 0 exits rather than hang in its next collective, the
    launcher restarts the worker, both ranks and both host segments come back, requests are served
    again, and stopping the replica leaves no segment behind."""
    r = replica_factory(*TP2, "--offload-mode", "full", "--kv-cache-dtype", "bfloat16", "--num-gpu-blocks", "64",
                        "--num-cpu-blocks", "128", "--max-model-len", "512")
    segments = [f"/dev/shm/{r.config.shm_name}", f"/dev/shm/{r.config.for_rank(1).shm_name}"]
    assert all(os.path.exists(s) for s in segments)
    body = {"model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    assert httpx.post(r.url + "/v1/completions", json=body, timeout=120).status_code == 200
    (rank1,) = rank_children(r, b"gpu-worker")
    rank0 = worker_pid(r)
    os.kill(rank1, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(rank0), 30), "rank 0 outlived its follower"
    # (the gateway notices the dead rank 0 a moment after it is gone: until then /ready still says 200)
    assert wait_until(lambda: worker_pid(r) not in (None, rank0) and http_status(r.url + "/ready") == 200, 240)
    (new_rank1,) = rank_children(r, b"gpu-worker")
    assert new_rank1 != rank1 and all(os.path.exists(s) for s in segments)
    resp = httpx.post(r.url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
    r.stop()
    assert not any(os.path.exists(s) for s in segments), "a rank's host segment outlived the replica"
