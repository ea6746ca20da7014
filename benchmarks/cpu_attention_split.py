"""CPU attention under tensor parallelism: one process over every rank's KV heads, or one per rank?

Both layouts read the same bytes per decode step. ``one``: a single process with T threads attends
over all KV heads (what one cpu_attention process serving every rank's pool would do). ``split``:
N processes, one per rank, each with T/N threads pinned to its own contiguous share of the cores
(``neo_common.host_kernel.cpus.rank_cpus``, what ``neo cpu-attention --tensor-parallel-size N`` runs),
each over its rank's KV heads (``neo_common.tensor_parallel.Shard``), started together behind a
barrier; a step takes as long as the slowest rank. Reported: milliseconds per layer-step (median
of ``--reps``) and the host read bandwidth that implies (KV bytes read / time).

    python -m neo_bench.cpu_attention_split --model llama-3-70b --threads 12 --ranks 1,2,4 --out DIR

Prints a table, writes ``<out>/cpu_attention_split.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import time

import numpy as np

from neo_common.geometry import lookup
from neo_common.tensor_parallel import Shard

log = logging.getLogger("neo_bench.cpu_attention_split")
BLOCK = 16


def _bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """bf16 bit patterns of values in about [-1, 1] (random exponents would make NaNs)."""
    return (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _attend_loop(kv_heads: int, q_heads: int, head_dim: int, requests: int, context: int, threads: int,
                 cpus: set[int] | None, reps: int, barrier, out, slot: int) -> None:
    """One process: pin, size the pool, build one layer's KV, then time ``reps`` steps after the barrier."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    from neo_common.host_kernel import kernel

    kernel.set_num_threads(threads)
    rng = np.random.default_rng(slot)
    per_row = -(-context // BLOCK)
    blocks = requests * per_row
    k, v = (_bits(rng, (blocks, kv_heads, BLOCK, head_dim)) for _ in range(2))
    tables = rng.permutation(blocks).astype(np.int32).reshape(requests, per_row)
    lens = np.full(requests, context, np.int32)
    q = _bits(rng, (requests, q_heads, head_dim))
    o = np.empty_like(q)
    kernel.attend(q, k, v, tables, lens, out=o)   # warm-up: pages in, pool threads started
    barrier.wait()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        kernel.attend(q, k, v, tables, lens, out=o)
        times.append(time.perf_counter() - t0)
        barrier.wait()   # ranks step together, as they do per layer in the pipeline
    out.put((slot, statistics.median(times), kernel.get_num_threads()))


def run_layout(g, ranks: int, threads: int, requests: int, context: int, reps: int) -> dict:
    from neo_common.host_kernel.cpus import rank_cpus

    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(ranks), ctx.Queue()
    procs = []
    for r in range(ranks):
        shard = Shard.of(g, r, ranks).local_geometry(g)
        cpus = rank_cpus(r, ranks) if ranks > 1 else set(sorted(os.sched_getaffinity(0))[:threads])
        procs.append(ctx.Process(target=_attend_loop, args=(
            shard.num_kv_heads, shard.num_heads, g.head_dim, requests, context, max(1, threads // ranks), cpus,
            reps, barrier, out, r)))
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    step_s = max(t for _, t, _ in results)
    kv_bytes = 2 * g.num_kv_heads * g.head_dim * 2 * requests * context   # K and V, bf16, one layer
    return {"layout": "one" if ranks == 1 else f"split x{ranks}", "ranks": ranks,
            "threads_per_process": [n for _, _, n in results], "per_rank_ms": [t * 1e3 for _, t, _ in results],
            "step_ms": step_s * 1e3, "read_gbps": kv_bytes / step_s / 1e9}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m neo_bench.cpu_attention_split", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3-70b", help="named geometry")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 4), help="T: threads in all")
    ap.add_argument("--ranks", default="1,2", help="comma list of process counts (1 = one process)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048, help="tokens per request")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    g = lookup(args.model)
    rows = [run_layout(g, int(n), args.threads, args.requests, args.context, args.reps)
            for n in args.ranks.split(",")]
    lines = [f"{'layout':<10} {'threads':>10} {'step ms':>9} {'GB/s':>7}  per-rank ms"]
    lines += [f"{r['layout']:<10} {'+'.join(map(str, r['threads_per_process'])):>10} {r['step_ms']:>9.2f} "
              f"{r['read_gbps']:>7.1f}  {', '.join(f'{t:.2f}' for t in r['per_rank_ms'])}" for r in rows]
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    report = {"model": g.name, "threads": args.threads, "requests": args.requests, "context": args.context,
              "cpu_count": os.cpu_count(), "rows": rows}
    with open(os.path.join(args.out, "cpu_attention_split.json"), "w") as f:
        json.dump(report, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["layout"] for r in rows], [r["read_gbps"] for r in rows])
    ax.set_ylabel("KV read GB/s")
    ax.set_title(f"{g.name}: {args.requests} x {args.context} tokens, {args.threads} threads in all")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "cpu_attention_split.png"), dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
