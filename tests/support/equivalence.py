"""Shared pieces of the end-to-end equivalence tests (offloading, tensor parallelism): a seeded
workload of token-id prompts, running it through a replica's HTTP API, reading its metrics, and
cost tables that make ``auto`` offload on the CPU twin."""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import os

import httpx
import numpy as np

from neo_common.model_source import embedded_gguf_path
from neo_gateway.cost_model import CostTables


def model_under_test(model: str, random_folder) -> tuple[list[str], str]:
    """`neo serve` flags and the served name: the embedded SmolLM2 for ``smollm2``, else the random
    HF model ``random_folder()`` builds, served as ``model`` with the embedded model's tokenizer."""
    if model == "smollm2":
        return [], "smollm2-135m-instruct"
    return ["--model", random_folder(), "--tokenizer", embedded_gguf_path(), "--served-model-name", model], model


def workload(seed: int = 0, num_requests: int = 64) -> list[tuple[list[int], int]]:
    """``num_requests`` token-id prompts of 3..60 tokens with 4..40 new tokens each: decodes cross
    block boundaries, so GPU requests must grow (and be swapped out). Contexts stay under 128 tokens, so the kernel
    never splits a request across threads: its sums are the same in every batch."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(100, 49000, int(rng.integers(3, 61))).tolist(), int(rng.integers(4, 41)))
            for _ in range(num_requests)]


def filling_wave(blocks: int, block_size: int = 16, per_request: int = 4) -> list[tuple[list[int], int]]:
    """Requests whose prompts fill ``blocks`` KV blocks exactly and then decode 40 tokens each: on a
    GPU pool of that size, admitted before anything else, their first decode step must evict one of
    them (a swap-out in ``auto`` mode, whatever the rest of the workload does)."""
    rng = np.random.default_rng(99)
    return [(rng.integers(100, 49000, per_request * block_size).tolist(), 40) for _ in range(blocks // per_request)]


def complete_all(url: str, model: str, requests, first: int = 0) -> list[str]:
    """Every request at once (greedy, exactly ``max_tokens`` each); the texts in request order. With
    ``first``, the first ``first`` requests go alone and the rest follow once the replica runs them."""
    return asyncio.run(_complete_all(url, model, requests, first))


async def _complete_all(url: str, model: str, requests, first: int) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(prompt, max_tokens):
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0,
                                                            "max_tokens": max_tokens, "ignore_eos": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["completion_tokens"] == max_tokens
            return body["choices"][0]["text"]

        async def running() -> float:
            return value(metrics_of((await client.get("/metrics")).text), "neo:num_requests_running")

        leading = [asyncio.ensure_future(one(p, n)) for p, n in requests[:first]]
        for _ in range(600):
            if not first or await running() >= first:
                break
            await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(one(p, n)) for p, n in requests[first:]]
        return await asyncio.gather(*leading, *rest)


def metrics(url: str) -> dict[str, float]:
    return metrics_of(httpx.get(url + "/metrics", timeout=10).text)


def metrics_of(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("neo:"):
            name, number = line.rsplit(" ", 1)
            out[name] = float(number)
    return out


def value(m: dict[str, float], name: str, **labels) -> float:
    for key, v in m.items():
        if key.split("{")[0] == name and all(f'{k}="{val}"' in key for k, val in labels.items()):
            return v
    raise KeyError(name)


def fast_host_tables(cost_cache: str, folder) -> str:
    """The newest profile in ``cost_cache`` (a ``full`` replica's, run just before) reshaped so that ``auto`` always
    gains from CPU decoding: CPU attention 1000x cheaper, no stage overhead, and dense cost
    proportional to the batch (no fixed part, so splitting a batch in two sub-batches costs nothing).

    On the CPU twin the "GPU" is this same 2-core host, where the policy rightly sees nothing to
    gain from CPU decoding and, with the admission gate, would keep every request off the host pool.
    Only cheaper CPU attention was not enough: the measured stage overhead and the dense layers'
    fixed cost are noisy on a 2-core host, and a profile where they were large made the policy keep
    every decode on the GPU. With these tables the pipelined plan serves strictly more rows per
    second whenever a CPU decode exists, so ``auto`` places, prefills and decodes requests on the
    CPU in every run, which is the path whose outputs the tests compare. (Such a replica runs with
    ``--calibrate-pipeline false``: its measured forwards are of course far slower than these
    tables predict, and calibration would rightly turn the pipeline off.)"""
    path = max(glob.glob(os.path.join(cost_cache, "*.json")), key=os.path.getmtime)  # this model's, just profiled
    tables = CostTables.load(path)
    per_token = tables.linr_y[-1] / tables.linr_x[-1]
    fast = dataclasses.replace(tables, cdec_y=[[v * 1e-3 for v in row] for row in tables.cdec_y], lnch=0.0,
                               linr_y=[x * per_token for x in tables.linr_x])
    return fast.save(str(folder / "fast-host-cost.json"))
