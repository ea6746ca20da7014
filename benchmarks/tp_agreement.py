"""Tensor parallelism on a real multi-GPU host: do TP=N's greedy texts match TP=1's, and how fast?

For each ``--variant "NAME|FLAGS"`` (the first is the reference) the script starts its own
``neo serve`` with the common flags plus FLAGS, sends the same seeded random-token prompts at once
(greedy, ``ignore_eos``), and stops it by PID. It reports, per variant: requests whose text equals
the reference's, the mean share of the reference's text that matches before the first difference,
and output tokens per second.

Which comparisons mean something: dummy weights give near-uniform logits (top-2 gaps of a few
hundredths), and in bf16 an NCCL all-reduce sums in another order than one GPU's matmul, enough
to flip such near-ties within a few tokens: TP=1 vs TP=2 in bf16 parts early even when correct.
So the runs compare (a) TP=1 vs TP=2 in float32 with the torch kernels, eager (rounding ~1e-6:
texts must match), and (b) TP=2 eager vs TP=2 with CUDA graphs in bf16 with the Triton kernels (the
same sums in the same order: the captured NCCL all-reduce must replay exactly). Exact equality of
TP=1 and TP=2 is also tested on the CPU twin: tests/integration/test_tensor_parallel.py.

    python -m neo_bench.tp_agreement --model llama-3-8b --load-format dummy --tokenizer .gpu/tokenizer \\
        --variant "tp1|--tensor-parallel-size 1 --dtype float32 --kernels torch --enforce-eager" \\
        --variant "tp2|--tensor-parallel-size 2 --dtype float32 --kernels torch --enforce-eager" --out DIR

Prints a table, writes ``<out>/tp_agreement_<label>.json`` and ``.png``; exits 1 if a server did not
come up or a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time

import numpy as np

from neo_bench.neo_vs_gpu_only import Server, hardware
from neo_common.procs import serve_port_flags

log = logging.getLogger("neo_bench.tp_agreement")


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, int(rng.integers(8, 65))).tolist() for _ in range(n)]


async def complete(url: str, model: str, batch: list[list[int]], max_tokens: int) -> tuple[list[str], float]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=1200) as client:
        async def one(p):
            r = await client.post("/v1/completions", json={"model": model, "prompt": p, "max_tokens": max_tokens,
                                                            "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return r.json()["choices"][0]["text"]
        t0 = time.perf_counter()
        texts = await asyncio.gather(*(one(p) for p in batch))
        return list(texts), time.perf_counter() - t0


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def agreement(ref: list[str], texts: list[str]) -> dict:
    shares = [common_prefix(a, b) / max(1, len(a)) for a, b in zip(ref, texts)]
    return {"equal": sum(a == b for a, b in zip(ref, texts)), "requests": len(ref),
            "mean_prefix_share": float(np.mean(shares)), "min_prefix_share": float(np.min(shares)),
            "prefix_shares": shares}


def run_variant(args: argparse.Namespace, name: str, flags: list[str], batch: list[list[int]]) -> dict:
    argv = [*args.serve_args, *flags, *serve_port_flags(8)]
    server = Server(argv, os.path.join(args.out, f"serve_{name}_{args.label}.log"))
    try:
        t0 = time.perf_counter()
        server.wait_ready(args.ready_timeout)
        ready_s = time.perf_counter() - t0
        model = server.served_model()
        asyncio.run(complete(server.url, model, batch[:4], 8))  # warm-up
        texts, wall = asyncio.run(complete(server.url, model, batch, args.max_tokens))
    finally:
        server.stop()
    return {"name": name, "flags": flags, "texts": texts, "wall_s": wall, "ready_s": ready_s,
            "output_tok_s": len(batch) * args.max_tokens / wall}


def table(report: dict) -> str:
    lines = [f"{'variant':<12} {'equal':>9} {'prefix mean':>12} {'prefix min':>11} {'out tok/s':>10} {'ready s':>8}"]
    for r in report["runs"]:
        a = r["agreement"]
        lines.append(f"{r['name']:<12} {a['equal']:>4}/{a['requests']:<4} {a['mean_prefix_share']:>12.3f} "
                     f"{a['min_prefix_share']:>11.3f} {r['output_tok_s']:>10.1f} {r['ready_s']:>8.1f}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in report["runs"][1:]:
        ax.hist(r["agreement"]["prefix_shares"], bins=20, range=(0, 1), alpha=0.6, label=r["name"])
    ax.set_xlabel(f"share of {report['runs'][0]['name']}'s text before the first difference")
    ax.set_ylabel("requests")
    ax.set_title(f"{report['label']}: greedy agreement with {report['runs'][0]['name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m neo_bench.tp_agreement", description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", required=True,
                    help='"NAME|FLAGS": a run with these extra `neo serve` flags; the first is the reference')
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument("--label", default="tp")
    ap.add_argument("--out", default=".")
    args, serve_args = ap.parse_known_args(argv)
    args.serve_args = serve_args  # everything else goes to `neo serve` unchanged
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    batch = prompts(args.num_prompts, args.vocab)
    variants = [(v.split("|", 1)[0], v.split("|", 1)[1].split() if "|" in v else []) for v in args.variant]
    try:
        runs = [run_variant(args, name, flags, batch) for name, flags in variants]
    except Exception as exc:  # a server that did not come up, a failed request
        log.error("%s", exc)
        return 1
    for r in runs:
        r["agreement"] = agreement(runs[0]["texts"], r["texts"])
    report = {"label": args.label, "serve_args": args.serve_args, "hardware": hardware(None), "runs": runs}
    text = table(report)
    print(text)
    with open(os.path.join(args.out, f"tp_agreement_{args.label}.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(report, os.path.join(args.out, f"tp_agreement_{args.label}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
