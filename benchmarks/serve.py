"""`neo bench`: an online serving benchmark against any OpenAI-compatible server.

Requests arrive as a Poisson process (gamma inter-arrival times with shape `burstiness`; 1 is
Poisson, `inf` rate sends everything at t=0) with synthetic token-id prompts of fixed, uniform
(+-ratio) or the NEO paper's workload lengths; one run per request rate of a sweep. For each rate it
reports what vLLM's benchmark reports (request and token throughput; TTFT, TPOT, ITL and E2E mean,
p50, p90, p99; goodput under an SLO) plus NEO's normalized per-token latency (E2E / output tokens),
prints a table, and writes JSON and a PNG of latency against request rate.

    neo bench --url http://127.0.0.1:8000 --model llama-3-8b --workload paper-a --rates 1,2,4,inf --out DIR

``--workload multiturn`` runs chat conversations that resend their history every turn instead
(``neo_bench.multiturn``; ``--rates`` are then conversation arrivals per second) and reports TTFT of
first and later turns and the prefix cache's hit rates per tier:

    neo bench --model llama-3-8b --workload multiturn --num-conversations 64 --num-turns 6 \\
        --system-prompt-len 1024 --user-len 128 --answer-len 256 --think-time 2 --rates 2 --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time

import numpy as np

# name -> (input mean, input +- ratio, output low, output high, output +- ratio)
WORKLOADS = {
    "paper-a": (1000, 0.10, 50, 400, 0.10),    # NEO (a): Llama-3-8B on A10G
    "paper-b": (372, 0.10, 45, 45, 0.10),      # NEO (b): summarization-like, Llama-2-7B on T4
}


def sample_lengths(args: argparse.Namespace, rng: np.random.Generator) -> list[tuple[int, int]]:
    n = args.num_prompts
    if args.workload in WORKLOADS:
        inp, ir, lo, hi, orr = WORKLOADS[args.workload]
        ins = rng.integers(int(inp * (1 - ir)), int(inp * (1 + ir)) + 1, n)
        outs = rng.integers(int(lo * (1 - orr)), int(hi * (1 + orr)) + 1, n)
    elif args.workload == "uniform":
        r = args.range_ratio
        ins = rng.integers(int(args.input_len * (1 - r)), int(args.input_len * (1 + r)) + 1, n)
        outs = rng.integers(max(1, int(args.output_len * (1 - r))), int(args.output_len * (1 + r)) + 1, n)
    else:
        ins, outs = np.full(n, args.input_len), np.full(n, args.output_len)
    return [(max(1, int(i)), max(1, int(o))) for i, o in zip(ins, outs)]


def arrival_gaps(rate: float, burstiness: float, n: int, rng: np.random.Generator) -> np.ndarray:
    if math.isinf(rate):
        return np.zeros(n)
    theta = 1.0 / (rate * burstiness)  # gamma with mean 1/rate
    return rng.gamma(burstiness, theta, n)


async def one_request(client, model: str, prompt: list[int], max_tokens: int, extra_body: dict | None = None) -> dict:
    """One streamed completion, ``ignore_eos`` and ``extra_body``'s fields: its timings, tokens, text, finish reason."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    text, tokens, finish, error = [], 0, None, None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **(extra_body or {})})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
                text.append(chunk.choices[0].text)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # a failed request counts as such; the run goes on
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    return {"start": t0, "ttft": (stamps[0] - t0) if stamps else None, "e2e": end - t0, "tokens": tokens,
            "itl": list(np.diff(stamps)), "prompt_tokens": len(prompt), "error": error, "finish_reason": finish,
            "text": "".join(text)}


def summarize(results: list[dict], wall: float, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r["error"] is None and r["ttft"] is not None]

    def stats(xs) -> dict:
        xs = np.asarray(list(xs), dtype=float)
        if xs.size == 0:
            return {}
        return {"mean": float(xs.mean()), "p50": float(np.percentile(xs, 50)), "p90": float(np.percentile(xs, 90)),
                "p99": float(np.percentile(xs, 99))}

    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    good = [r for r in ok if r["ttft"] <= slo.get("ttft", math.inf)
            and (r["tokens"] <= 1 or (r["e2e"] - r["ttft"]) / (r["tokens"] - 1) <= slo.get("tpot", math.inf))]
    out_tokens = sum(r["tokens"] for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": wall,
        "request_throughput": len(ok) / wall, "output_throughput": out_tokens / wall,
        "total_token_throughput": (out_tokens + sum(r["prompt_tokens"] for r in ok)) / wall,
        "goodput": len(good) / wall,
        "ttft_s": stats(r["ttft"] for r in ok), "tpot_s": stats(tpot),
        "itl_s": stats(x for r in ok for x in r["itl"]), "e2e_s": stats(r["e2e"] for r in ok),
        "normalized_latency_s_per_token": stats(r["e2e"] / r["tokens"] for r in ok if r["tokens"]),
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
    }


async def run_rate(args: argparse.Namespace, rate: float, rng: np.random.Generator) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    lengths = sample_lengths(args, rng)
    prompts = [rng.integers(100, args.vocab, n).tolist() for n, _ in lengths]
    gaps = arrival_gaps(rate, args.burstiness, len(lengths), rng)
    progress = _progress(len(lengths), f"rate {rate:g} req/s")
    tasks = []
    t0 = time.perf_counter()
    for prompt, (_, out_len), gap in zip(prompts, lengths, gaps):
        await asyncio.sleep(gap)
        task = asyncio.create_task(one_request(client, args.model, prompt, out_len))
        task.add_done_callback(lambda _t: progress.update(1))
        tasks.append(task)
    results = await asyncio.gather(*tasks)
    progress.close()
    summary = summarize(results, time.perf_counter() - t0, args.slo)
    return {"rate": rate, **summary}


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False)
    except ImportError:
        class _Quiet:
            def update(self, _n: int) -> None: ...
            def close(self) -> None: ...
        return _Quiet()


def plot(runs: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in runs if not math.isinf(r["rate"]) and r["completed"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (("normalized_latency_s_per_token", axes[0], "per-token latency (s/token)"),
                           ("ttft_s", axes[1], "TTFT (s)")):
        for q in ("p50", "p99"):
            ax.plot([r["rate"] for r in finite], [r[key].get(q, float("nan")) for r in finite], "o-", label=q)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    from neo_bench import multiturn   # it imports this module

    ap = argparse.ArgumentParser(prog="neo bench", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--rates", default="inf", help="comma list of request rates (req/s; multiturn: conversations/s); "
                                                   "inf = all at once")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    ap.add_argument("--workload", default="fixed", choices=["fixed", "uniform", *WORKLOADS, "multiturn"])
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--range-ratio", type=float, default=0.1)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    ap.add_argument("--goodput", default="", help="SLO, e.g. ttft:2000,tpot:100 (milliseconds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default="")
    multiturn.add_args(ap)
    args = ap.parse_args(argv)
    if args.workload == "multiturn" and (problem := multiturn.check_args(args)):
        ap.error(problem)
    args.slo = {k: float(v) / 1e3 for k, v in (p.split(":") for p in args.goodput.split(",") if p)}
    return args


def main(argv=None) -> int:
    from neo_bench import multiturn

    args = parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    runs = []
    for rate in rates:
        if args.workload == "multiturn":
            runs.append(multiturn.run(args, rate, args.seed))
        else:
            runs.append(asyncio.run(run_rate(args, rate, np.random.default_rng(args.seed))))
    head = f"{'rate':>6} {'done':>5} {'fail':>4} {'req/s':>7} {'tok/s':>8} {'TTFT p50/p99 ms':>17} " \
           f"{'TPOT p50/p99 ms':>17} {'ITL p99 ms':>10} {'s/token p50':>11}"
    lines = [head]
    for r in runs:
        ms = lambda d, q: d.get(q, float("nan")) * 1e3  # noqa: E731
        lines.append(f"{r['rate']:>6g} {r['completed']:>5} {r['failed']:>4} {r['request_throughput']:>7.2f} "
                     f"{r['output_throughput']:>8.1f} {ms(r['ttft_s'], 'p50'):>8.0f}/{ms(r['ttft_s'], 'p99'):<8.0f} "
                     f"{ms(r['tpot_s'], 'p50'):>8.1f}/{ms(r['tpot_s'], 'p99'):<8.1f} {ms(r['itl_s'], 'p99'):>10.1f} "
                     f"{r['normalized_latency_s_per_token'].get('p50', float('nan')):>11.3f}")
    print(multiturn.table(runs) if args.workload == "multiturn" else "\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"bench{'_' + args.label if args.label else ''}")
        config = {k: v for k, v in vars(args).items()}
        with open(stem + ".json", "w") as f:
            json.dump({"config": config, "runs": runs}, f, indent=2)
        plot(runs, stem + ".png", f"{args.model} {args.workload} {args.label}".strip())
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
