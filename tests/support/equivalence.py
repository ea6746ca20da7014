"""Shared pieces of the equivalence tests. End to end (offloading, tensor parallelism): a seeded
workload of token-id prompts, running it through a replica's HTTP API, reading its metrics, and
cost tables that make ``auto`` offload on the CPU twin. Model level (every family against
``transformers``): greedy generation through a ``ModelRunner`` with chunked prefill and batched
paged decode over scattered block tables, compared token for token and logit for logit."""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import os
from typing import TYPE_CHECKING

import httpx
import numpy as np
import torch

from neo_common.model_source import ModelSource, embedded_gguf_path
from neo_common.protocol import IterationPlan
from neo_common.cost_model import CostTables

if TYPE_CHECKING:
    from neo_gpu_worker.model_runner import ModelRunner


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
            return value(metrics_of((await client.get("/metrics")).text), "vllm:num_requests_running")

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
        if line.startswith(("neo:", "vllm:")):
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


# -- model level: our runner against transformers ---------------------------------------------
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NEW_TOKENS = 32
BLOCK = 16


def make_plan(rows: list[tuple[int, int, list[int], list[int]]]) -> IterationPlan:
    """rows: (seq_id, start_pos, tokens, block_table) -> a greedy plan sampling every row."""
    b = len(rows)
    width = max(len(r[3]) for r in rows)
    bt = np.full((b, width), -1, np.int32)
    for i, r in enumerate(rows):
        bt[i, :len(r[3])] = r[3]
    return IterationPlan(
        iteration_id=1, seq_ids=np.array([r[0] for r in rows], np.int64), places=np.zeros(b, np.uint8),
        sub_batch=np.zeros(b, np.uint8), start_pos=np.array([r[1] for r in rows], np.int32),
        num_tokens=np.array([len(r[2]) for r in rows], np.int32),
        token_ids=np.array([t for r in rows for t in r[2]], np.int32), block_tables=bt,
        sample=np.ones(b, np.uint8), temperature=np.zeros(b, np.float32), top_p=np.ones(b, np.float32),
        top_k=np.full(b, -1, np.int32), seeds=np.full(b, -1, np.int64), steps=np.zeros(b, np.int32))


def generate(runner: ModelRunner, prompts: list[list[int]], new_tokens: int, chunk: int = 7) -> list[list[int]]:
    """Greedy: prompts prefilled in chunks of `chunk` tokens (all rows together), then batched decode."""
    rng = np.random.default_rng(0)
    max_len = max(len(p) for p in prompts) + new_tokens
    need = -(-max_len // BLOCK)
    perm = rng.permutation(runner.num_blocks)  # scattered, non-contiguous tables
    tables = [perm[i * need:(i + 1) * need].tolist() for i in range(len(prompts))]
    outs: list[list[int]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        rows, owners = [], []
        for i, p in enumerate(prompts):
            if done[i] < len(p):
                piece = p[done[i]:done[i] + chunk]
                rows.append((i, done[i], piece, tables[i]))
                owners.append(i)
                done[i] += len(piece)
        res = runner.execute(make_plan(rows))
        for i, tok in zip(res.seq_ids.tolist(), res.token_ids.tolist()):
            if done[i] == len(prompts[i]) and not outs[i]:
                outs[i].append(tok)
    for _ in range(new_tokens - 1):
        rows = [(i, len(p) + len(outs[i]) - 1, [outs[i][-1]], tables[i]) for i, p in enumerate(prompts)]
        res = runner.execute(make_plan(rows))
        for i, tok in zip(res.seq_ids.tolist(), res.token_ids.tolist()):
            outs[i].append(tok)
    return outs


def reference_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Plain argmax loop with the KV cache of `transformers` (EOS does not stop it, as in ours)."""
    with torch.no_grad():
        out = model(torch.tensor([prompt], device=DEVICE), use_cache=True)
        first_logits = out.logits[0, -1].float()
        tokens = [int(first_logits.argmax())]
        for _ in range(new_tokens - 1):
            out = model(torch.tensor([[tokens[-1]]], device=DEVICE), past_key_values=out.past_key_values,
                        use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, first_logits


def last_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    plan = make_plan([(0, 0, prompt, list(range(-(-len(prompt) // BLOCK))))])
    from neo_gpu_worker.batch import build_sub_batch

    sb = build_sub_batch(plan, np.arange(plan.batch_size), BLOCK, DEVICE, 0)
    with torch.inference_mode():
        hidden = runner.model(sb.input_ids, sb.positions, runner.kv_cache, sb.meta)
        return runner.model.compute_logits(hidden[sb.last_token[-1:]])[0]


def check_equivalent(ours: ModelRunner, ref, prompts: list[list[int]], atol: float) -> None:
    got = generate(ours, prompts, NEW_TOKENS)
    for prompt, tokens in zip(prompts, got):
        want, ref_logits = reference_greedy(ref, prompt, NEW_TOKENS)
        assert tokens == want, f"prompt {prompt[:8]}...: ours {tokens} vs transformers {want}"
        ours_logits = last_logits(ours, prompt)
        assert torch.allclose(ours_logits, ref_logits, atol=atol, rtol=0), \
            f"max logit difference {(ours_logits - ref_logits).abs().max().item()}"


def compare_random(tmp_path, config, prompt_len: int, atol: float = 1e-3, convert=None) -> None:
    """A random ``transformers`` model of ``config`` (saved by ``random_hf_folder``) against ours,
    loaded from that folder, or from the ``ModelSource`` that ``convert(folder)`` returns (e.g. a
    GGUF written from it): greedy tokens equal over ``NEW_TOKENS``, last-prompt logits within ``atol``."""
    import transformers

    from support.random_model import random_hf_folder

    folder = random_hf_folder(tmp_path, config)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEVICE).eval()
    source = convert(folder) if convert else ModelSource("hf", folder, "random")
    runner = runner_for(source, config.max_position_embeddings)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (prompt_len, prompt_len // 2 + 3, 5)]
    check_equivalent(runner, ref, prompts, atol=atol)


def runner_for(source: ModelSource, max_len: int):
    """Our model from ``source`` in float32 on ``DEVICE``, over a 96-block pool."""
    from neo_common.model_source import read_geometry
    from neo_gpu_worker.loader import load_model
    from neo_gpu_worker.model_runner import ModelRunner

    max_len = min(max_len, read_geometry(source).max_position_embeddings)
    return ModelRunner(load_model(source, max_len, DEVICE, torch.float32), 96, BLOCK, DEVICE, torch.float32)


def prefill_hidden(model, tokens: list[int], block_size: int = 16) -> torch.Tensor:
    """The final hidden states of one whole-prompt prefill of ``tokens`` into a fresh, flat KV cache
    (one block per layer: the prompt must fit ``2 * block_size`` slots)."""
    from neo_gpu_worker.attention import AttentionMetadata, PrefillSpan

    g = model.geometry
    n = len(tokens)
    kv = torch.zeros((g.num_layers, 2, 2, block_size, g.num_kv_heads, g.head_dim))
    slots = torch.arange(n)
    meta = AttentionMetadata.for_prefill(slots, PrefillSpan(0, n, 0, slots))
    with torch.inference_mode():
        return model(torch.tensor(tokens), torch.arange(n), kv, meta)
