"""Prefix caching off vs GPU-only caching vs GPU + host tier, on the multi-turn chat workload.

One `neo serve` per variant, identical flags but the cache's (``VARIANTS``):

- ``off``:  ``--enable-prefix-caching false``: every turn prefills its whole history;
- ``gpu``:  ``--host-prefix-cache-fraction 0``: cached blocks the GPU pool evicts are dropped;
- ``host``: the defaults: they are demoted to the host pool and a returning conversation's history is
  swapped back in or, placed on the CPU, attended there (docs/design.md, "Prefix caching").

Every variant runs with the same ``--offload-mode`` (default ``auto``) and ``--num-cpu-blocks``: the
host tier is a use of the host KV pool, which exists only with offloading on (the scheduler gets a
host pool only with cpu_attention links), so the variants differ by the cache flag alone. Servers are
started, warmed up and stopped by ``neo_vs_gpu_only`` (``Server``, ``start_server``, ``run_all``:
live servers by default, ``--no-live-servers`` for a fresh one per run); the variants run ``--reps``
times in ABBA order (``comparison``), every variant of a repetition the same conversations (workload
``neo_bench.multiturn``, seeded), each repetition new ones (its own system prompt too, so a live
server's cache never serves a repetition what an earlier one computed).

Per variant: TTFT p50 of later turns, output throughput and TPOT p99 as min / median / max over the
repetitions, each with its verdict against ``--base`` (default ``gpu``): the median ratio, its range,
and "no difference" when the ranges overlap; the prefix-cache hit rate per tier; and the issue's
targets for ``host`` against ``gpu`` (TTFT <= 0.4x, throughput >= 1.3x, TPOT p99 <= 1.1x).

    python -m neo_bench.prefix_cache --model llama-3-8b --load-format dummy --tokenizer .gpu/tokenizer \\
        --num-gpu-blocks 2000 --num-cpu-blocks 24000 --num-conversations 96 --num-turns 6 \\
        --system-prompt-len 1024 --user-len 256 --answer-len 256 --think-time 2 --rate 4 --out DIR

Prints a table, writes ``<out>/prefix_cache_<label>.json``; exits 1 if a server did not come up or
any turn failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys

from neo_bench import multiturn
from neo_bench.comparison import abba_order, describe, spread_bars, summarize_modes
from neo_bench.neo_vs_gpu_only import add_serve_arguments, hardware, run_all

log = logging.getLogger(__name__)

VARIANTS = {  # label -> the serve flags that make it (on top of the common ones)
    "off": ["--enable-prefix-caching", "false"],
    "gpu": ["--host-prefix-cache-fraction", "0"],
    "host": [],
}
FIGURES = {  # report key -> the figure of one run
    "ttft_later_p50_s": lambda r: r["ttft_later_turns_s"].get("p50"),
    "output_throughput": lambda r: r["output_throughput"],
    "tpot_p99_s": lambda r: r["tpot_s"].get("p99"),
    "hit_rate_gpu": lambda r: r["prefix_cache"]["hit_rate"]["gpu"],
    "hit_rate_host": lambda r: r["prefix_cache"]["hit_rate"]["host"],
}
TARGETS = {  # figure -> (the host tier's median ratio over GPU-only caching's must be, bound): issue 18
    "ttft_later_p50_s": ("<=", 0.4),
    "output_throughput": (">=", 1.3),
    "tpot_p99_s": ("<=", 1.1),
}


def measure(args: argparse.Namespace, server, model: str, variant: str, rep: int, rates: list[float]) -> dict:
    """One repetition of one variant (``run_all``'s measure): the conversations of repetition ``rep``."""
    log.info("rep %d variant %s: %d conversations x %d turns", rep, variant, args.num_conversations, args.num_turns)
    run = multiturn.run(args, rates[0], args.seed + 1000 * rep, server.url, model)
    run.pop("turns")
    return {"mode": variant, "rep": rep, **run}


def summary(runs: list[dict], variants: list[str], base: str) -> dict:
    """Per figure, each variant's spread over its repetitions and its verdict against ``base``."""
    ok = {v: [r for r in runs if r["mode"] == v and not r.get("error")] for v in variants}
    return {key: summarize_modes(ok, fig, base) for key, fig in FIGURES.items()}


def targets(summ: dict, base: str) -> dict | None:
    """The issue's targets for ``host`` against ``base`` (None when either did not run)."""
    out = {}
    for key, (op, bound) in TARGETS.items():
        v = summ[key]["vs_" + base].get("host")
        if v is None or v["ratio"] is None:
            return None
        met = v["ratio"] <= bound if op == "<=" else v["ratio"] >= bound
        out[key] = {"ratio": v["ratio"], "target": f"{op} {bound}", "met": met}
    return out


def table(report: dict) -> str:
    summ, base = report["summary"], report["config"]["base"]

    def cell(key: str, variant: str, scale: float, fmt: str) -> str:
        s = summ[key]["spread"].get(variant)
        return "-" if s is None else "/".join(format(s[q] * scale, fmt) for q in ("min", "median", "max"))

    lines = [f"{'variant':>8} {'TTFT later p50 ms':>20} {'vs ' + base:>24} {'tok/s':>20} {'vs ' + base:>24} "
             f"{'TPOT p99 ms':>18} {'vs ' + base:>24} {'hit gpu':>7} {'hit host':>8}"]
    for v in report["config"]["variants"]:
        vs = {k: describe(summ[k]["vs_" + base][v]) if v != base else "(base)" for k in TARGETS}
        hits = [summ[f"hit_rate_{t}"]["spread"].get(v) for t in ("gpu", "host")]
        lines.append(f"{v:>8} {cell('ttft_later_p50_s', v, 1e3, '.0f'):>20} {vs['ttft_later_p50_s']:>24} "
                     f"{cell('output_throughput', v, 1, '.0f'):>20} {vs['output_throughput']:>24} "
                     f"{cell('tpot_p99_s', v, 1e3, '.1f'):>18} {vs['tpot_p99_s']:>24} "
                     + " ".join(f"{100 * h['median']:>6.1f}%" if h else f"{'-':>7}" for h in hits))
    if report["targets"]:
        lines.append("host vs " + base + ": " + ", ".join(
            f"{k} {t['ratio']:.2f}x (target {t['target']}: {'met' if t['met'] else 'missed'})"
            for k, t in report["targets"].items()))
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Three panels (later turns' TTFT p50, output throughput, TPOT p99), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, runs = report["summary"], [r for r in report["runs"] if not r.get("error")]
    panels = (("ttft_later_p50_s", "TTFT p50, later turns (ms)", 1e3), ("output_throughput", "output tokens/s", 1.0),
              ("tpot_p99_s", "TPOT p99 (ms)", 1e3))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (key, label, scale) in zip(axes, panels):
        values = {v: [FIGURES[key](r) for r in runs if r["mode"] == v] for v in report["config"]["variants"]}
        spread_bars(ax, summ[key]["spread"], {v: [x for x in xs if x is not None] for v, xs in values.items()},
                    label, scale)
    c = report["config"]
    fig.suptitle(f"prefix caching, {c['model']}: {c['num_conversations']} conversations x {c['num_turns']} turns, "
                 f"{c['num_gpu_blocks']} GPU / {c['num_cpu_blocks']} host blocks, {c['reps']} reps ABBA "
                 f"(median, min-max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m neo_bench.prefix_cache", description=__doc__.splitlines()[0])
    srv = ap.add_argument_group("neo serve (same for every variant)")
    add_serve_arguments(srv, "host KV pool, and so the host tier's room")
    srv.add_argument("--offload-mode", default="auto", choices=["auto", "full", "throughput"],
                     help="every variant's (the host pool exists only with offloading on; default: %(default)s)")
    cmp = ap.add_argument_group("comparison")
    cmp.add_argument("--variants", default="off,gpu,host", help=f"comma list of {', '.join(VARIANTS)} "
                                                                "(default: %(default)s)")
    cmp.add_argument("--base", default="gpu", help="the variant the others are compared with (default: %(default)s)")
    cmp.add_argument("--reps", type=int, default=3, help="repetitions of every variant, ABBA (default: %(default)s)")
    cmp.add_argument("--live-servers", action=argparse.BooleanOptionalAction, default=True,
                     help="every variant's server up for the whole run (they share the GPU); "
                          "--no-live-servers: a fresh one per run")
    cmp.add_argument("--warmup", type=int, default=2, help="short requests per server before measuring "
                                                           "(default: %(default)s)")
    cmp.add_argument("--rate", type=float, default=math.inf,
                     help="conversation arrivals per second, Poisson; inf: all at once (default: %(default)s)")
    cmp.add_argument("--burstiness", type=float, default=1.0)
    cmp.add_argument("--range-ratio", type=float, default=0.1, help="+- of uniform lengths (default: %(default)s)")
    cmp.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below this")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--label", default="run")
    cmp.add_argument("--out", default=".")
    multiturn.add_args(ap)
    args = ap.parse_args(argv)
    args.modes = [v for v in args.variants.split(",") if v]
    if not args.modes or not set(args.modes) <= set(VARIANTS) or len(set(args.modes)) != len(args.modes):
        ap.error(f"--variants takes distinct names among {', '.join(VARIANTS)}")
    if args.base not in args.modes:
        ap.error(f"--base {args.base!r} is not among --variants")
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if not re.fullmatch(r"[\w.-]+", args.label):
        ap.error("--label takes letters, digits, '.', '_' and '-'")
    if problem := multiturn.check_args(args):
        ap.error(problem)
    args.variants = {v: (args.offload_mode, VARIANTS[v]) for v in args.modes}   # what start_server reads
    # start_server's warm-up draws one fixed-length request (workload generator of neo bench)
    args.workload, args.input_len, args.output_len, args.offline_prompts = "fixed", args.user_len, 16, 0
    args.slo = {}
    args.order = [f"{v}#{r}" for r, v in abba_order(args.modes, args.reps)]
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    infos, runs, scraped = run_all(args, [args.rate], measure=measure)
    summ = summary(runs, args.modes, args.base)
    config = {**{k: v for k, v in vars(args).items() if k != "variants"}, "variants": args.modes}
    report = {"config": config, "hardware": hardware(None), "order": args.order, "servers": infos, "runs": runs,
              "metrics": scraped, "summary": summ, "targets": targets(summ, args.base)}
    stem = os.path.join(args.out, f"prefix_cache_{args.label}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    plot(report, stem + ".png")
    print(table(report))
    failed = any(i.get("error") for i in infos.values()) or len(runs) != len(args.order) \
        or any(r.get("error") or r.get("failed") for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
