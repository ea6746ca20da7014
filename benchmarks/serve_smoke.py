"""Drive a running server with N concurrent streaming completions of fixed token lengths.

Prints a table and writes JSON: request and token throughput, TTFT, TPOT and end-to-end latency
percentiles. Prompts are random token ids, so any model geometry (dummy weights included) works.

    python benchmarks/serve_smoke.py --url http://127.0.0.1:8000 --model llama-3-8b \
        --requests 64 --prompt-len 512 --max-tokens 128 --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time

import numpy as np
from openai import AsyncOpenAI


async def one(client: AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, stamps, tokens = None, [], 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            stamps.append(now)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "e2e": end - t0, "tokens": tokens,
            "tpot": (end - first) / max(1, tokens - 1) if first else 0.0}


async def run(args: argparse.Namespace) -> dict:
    client = AsyncOpenAI(base_url=args.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, args.vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    sem = asyncio.Semaphore(args.concurrency or args.requests)

    async def limited(p: list[int]) -> dict:
        async with sem:
            return await one(client, args.model, p, args.max_tokens)

    await one(client, args.model, prompts[0][:16], 4)  # warm-up
    t0 = time.perf_counter()
    results = await asyncio.gather(*(limited(p) for p in prompts))
    wall = time.perf_counter() - t0
    out_tokens = sum(r["tokens"] for r in results)

    def pct(key: str) -> dict:
        xs = np.array([r[key] for r in results])
        return {"mean": float(xs.mean()), "p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}

    return {"config": vars(args), "host": platform.node(), "wall_s": wall, "requests": len(results),
            "req_per_s": len(results) / wall, "output_tok_per_s": out_tokens / wall,
            "total_output_tokens": out_tokens, "ttft_s": pct("ttft"), "tpot_s": pct("tpot"), "e2e_s": pct("e2e")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=0, help="0: all at once")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    res = asyncio.run(run(args))
    rows = [("requests", f"{res['requests']}"), ("wall (s)", f"{res['wall_s']:.2f}"),
            ("req/s", f"{res['req_per_s']:.2f}"), ("output tok/s", f"{res['output_tok_per_s']:.1f}")]
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        rows.append((key.replace("_s", " ms (p50/p99)"),
                     f"{res[key]['p50'] * 1e3:.1f} / {res[key]['p99'] * 1e3:.1f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
