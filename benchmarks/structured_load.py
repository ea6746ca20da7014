"""What structured outputs cost under load: a JSON-schema burst against the same unconstrained burst.

One `neo serve` (started, warmed up and stopped with ``neo_vs_gpu_only``'s ``start_server``) serves
both variants, which differ per request only, so they share one warm server:

- ``plain``: ``ignore_eos``, no constraint;
- ``json``:  ``ignore_eos`` and ``response_format`` ``json_schema`` (strict) with a schema that cannot
  be completed within ``max_tokens`` (one required string of at least ``CHARS_PER_TOKEN_BOUND x
  --output-len`` characters), so the grammar never ends a request early: the bitmask path runs on
  every step of every request.

Each run is a burst of ``--concurrency`` completions sent at once, prompts of ``--input-len`` random
token ids, ``max_tokens = --output-len``; every request must end with ``length`` after exactly
``--output-len`` tokens (and a ``json`` one's text must be a JSON prefix of the schema), so both
variants generate the same tokens. Each run draws its own prompts, so the prefix cache never
serves one run what another computed. After a warm-up burst of each variant, the variants run
``--reps`` times in ABBA order (``comparison``). Per run: output throughput over the burst's
makespan, TPOT p50, and the server's mean iteration time over the burst (gateway and worker, from
``/metrics`` before and after, ``neo_bench.overhead``) with the share of iterations launched ahead.

The figure: ``structured_cost = 1 - median(json tok/s) / median(plain tok/s)``, with the range of
the extremes and issue 17's target (< 5%); ranges that overlap are "no difference".

    python -m neo_bench.structured_load --model llama-3-8b --load-format dummy --tokenizer .gpu/tokenizer \\
        --num-gpu-blocks 2400 --max-num-seqs 64 --concurrency 64 --input-len 256 --output-len 256 --out DIR

Prints a table, writes ``<out>/structured_load_<label>.json`` and ``.png``; exits 1 if the server did
not come up or any request failed, did not end with ``length`` or generated other than ``--output-len``
tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import logging
import os
import re
import sys
import time

import numpy as np

from neo_bench.comparison import abba_order, describe, summarize_modes
from neo_bench.neo_vs_gpu_only import add_serve_arguments, hardware, variants_on_one_server
from neo_bench.overhead import overhead
from neo_bench.serve import one_request, summarize

log = logging.getLogger(__name__)

TARGET_COST = 0.05            # issue 17: structured requests cost < 5% throughput
CHARS_PER_TOKEN_BOUND = 256   # above any token's text (SmolLM2's longest: 81 characters), so the string cannot close
KEY = "text"
WARMUP_TOKENS = 16


class Variant(str, enum.Enum):
    PLAIN = "plain"
    JSON = "json"


class Verdict(str, enum.Enum):
    MET = "met"
    MISSED = "missed"
    NO_DIFFERENCE = "no difference"


FIGURES = {  # report key -> the figure of one run
    "output_throughput": lambda r: r["output_throughput"],
    "tpot_p50_s": lambda r: r["tpot_s"].get("p50"),
    "iteration_s": lambda r: r["iteration_s"],
    "worker_iteration_s": lambda r: r["worker_iteration_s"],
}


# -- requests ----------------------------------------------------------------------------------------
def schema(output_len: int) -> dict:
    """An object whose one string must be longer than ``output_len`` tokens can write."""
    return {"type": "object", "properties": {KEY: {"type": "string", "minLength": CHARS_PER_TOKEN_BOUND * output_len}},
            "required": [KEY], "additionalProperties": False}


def extra_body(variant: Variant, output_len: int) -> dict:
    body: dict = {"ignore_eos": True}
    if variant is Variant.JSON:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "structured_load", "schema": schema(output_len), "strict": True}}
    return body


_OPENING = [r"\{", '"', *map(re.escape, KEY), '"', ":", '"']   # the schema's text before the string's content
_WS_AFTER = {0, len(KEY) + 2, len(KEY) + 3}                     # JSON whitespace may follow '{', the key, ':'
_CLOSERS = ('"}', 'n"}', '0"}', '00"}', '000"}', '0000"}')       # after content, or mid-escape (\, \u, \uX ...)


def _opening_prefix() -> re.Pattern:
    pattern = ""
    for k in reversed(range(len(_OPENING))):   # a prefix of the opening: each atom optional after the one before
        pattern = _OPENING[k] + (r"\s*" if k in _WS_AFTER else "") + (f"(?:{pattern})?" if pattern else "")
    return re.compile(rf"\s*(?:{pattern})?")


_OPENING_PREFIX = _opening_prefix()


def json_prefix_ok(text: str) -> bool:
    """Whether ``text`` is a prefix of a JSON document of ``schema``: it closes into one (ended within
    the string, maybe mid-escape) or it is a prefix of the text before the string's content."""
    for closer in _CLOSERS:
        try:
            doc = json.loads(text + closer)
        except ValueError:
            continue
        if isinstance(doc, dict) and list(doc) == [KEY]:
            return True
    return _OPENING_PREFIX.fullmatch(text) is not None


async def burst(url: str, model: str, prompts: list[list[int]], max_tokens: int, body: dict) -> tuple[list, float]:
    """Every prompt at once; the results and the burst's makespan."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_request(client, model, p, max_tokens, body) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    return list(results), wall


def problems(results: list[dict], variant: Variant, max_tokens: int) -> list[str]:
    """What makes a run unfit for the comparison (at most 5 distinct)."""
    out = []
    for r in results:
        if r["error"]:
            out.append(r["error"])
        elif r["finish_reason"] != "length" or r["tokens"] != max_tokens:
            out.append(f"finish_reason {r['finish_reason']!r} after {r['tokens']} tokens (asked {max_tokens})")
        elif variant is Variant.JSON and not json_prefix_ok(r["text"]):
            out.append(f"not a JSON prefix of the schema: {r['text'][:80]!r}")
    return sorted(set(out))[:5]


# -- one run -----------------------------------------------------------------------------------------
def iteration_figures(before: str, after: str) -> dict:
    """Mean iteration times (gateway wall, worker), the share the worker launched ahead and the
    scheduler+IPC overhead over the iterations between two scrapes (``neo_bench.overhead``)."""
    try:
        o = overhead(after, since=before)
    except ValueError:   # no iteration in between (or no such histograms)
        return {"iteration_s": None, "worker_iteration_s": None, "iterations": 0, "launched_ahead_share": None,
                "overhead_fraction": None}
    return {"iteration_s": o["wall_ms"] / 1e3, "worker_iteration_s": o["worker_ms"] / 1e3,
            "iterations": o["iterations"], "launched_ahead_share": o["launched_ahead"] / o["iterations"],
            "overhead_fraction": o["overhead_fraction"]}


def prompts_for(args: argparse.Namespace, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, args.vocab, args.input_len).tolist() for _ in range(n)]


def measure(args: argparse.Namespace, server, model: str, variant: Variant, rep: int) -> dict:
    """One burst of ``variant``; its own prompts (seeded by repetition and variant)."""
    seed = args.seed + 1000 * rep + list(Variant).index(variant)
    log.info("rep %d variant %s: %d requests at once, %d tokens each", rep, variant.value, args.concurrency,
             args.output_len)
    before = server.get("/metrics")
    results, wall = asyncio.run(burst(server.url, model, prompts_for(args, args.concurrency, seed), args.output_len,
                                      extra_body(variant, args.output_len)))
    run = {"mode": variant.value, "rep": rep, **summarize(results, wall, {}),
           **iteration_figures(before, server.get("/metrics")),
           "problems": problems(results, variant, args.output_len), "sample_text": results[0]["text"][:200]}
    return run


# -- report ------------------------------------------------------------------------------------------
def structured_cost(throughput: dict, target: float = TARGET_COST) -> dict:
    """``1 - json/plain`` of median throughput, its range (worst and best pairing), and the verdict
    against ``target``: no difference when the variants' ranges overlap."""
    v = throughput["vs_" + Variant.PLAIN.value].get(Variant.JSON.value) or {}
    if v.get("ratio") is None:
        return {"cost": None, "cost_min": None, "cost_max": None, "target": target, "verdict": None}
    verdict = Verdict.NO_DIFFERENCE if not v["difference"] else \
        Verdict.MET if 1 - v["ratio"] < target else Verdict.MISSED
    return {"cost": 1 - v["ratio"], "cost_min": 1 - v["ratio_max"], "cost_max": 1 - v["ratio_min"],
            "target": target, "verdict": verdict.value}


def fit(run: dict) -> bool:
    """A run to compare: no error, no problem (a failed request would count its missing tokens as a slowdown)."""
    return not run.get("error") and not run.get("problems")


def summary(runs: list[dict]) -> dict:
    """Per figure, each variant's spread over its ``fit`` runs and its verdict against plain."""
    ok = {v.value: [r for r in runs if r["mode"] == v.value and fit(r)] for v in Variant}
    out = {key: summarize_modes(ok, fig, Variant.PLAIN.value) for key, fig in FIGURES.items()}
    out["structured_cost"] = structured_cost(out["output_throughput"])
    # json's median iteration time less plain's: what the bitmask path adds to one step
    out["bitmask_per_iteration_s"] = {key: _median_gap(out[key]) for key in ("iteration_s", "worker_iteration_s")}
    return out


def _median_gap(figure: dict) -> float | None:
    structured, plain = (figure["spread"].get(v.value) for v in (Variant.JSON, Variant.PLAIN))
    return None if structured is None or plain is None else structured["median"] - plain["median"]


def _ms(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x * 1e3, spec)


def table(report: dict) -> str:
    s, runs = report["summary"], report["runs"]
    lines = [f"{'variant':>8} {'reps':>4} {'tok/s min/med/max':>20} {'vs plain':>30} {'TPOT p50 ms':>11} "
             f"{'iter ms':>8} {'worker ms':>9} {'ahead':>6}"]
    for v in Variant:
        w = s["output_throughput"]["spread"].get(v.value)
        vs = s["output_throughput"]["vs_plain"].get(v.value)
        med = {k: (s[k]["spread"].get(v.value) or {}).get("median") for k in FIGURES}
        ahead = [r["launched_ahead_share"] for r in runs
                 if r["mode"] == v.value and fit(r) and r["launched_ahead_share"] is not None]
        mmm = "/".join(f"{w[q]:.0f}" for q in ("min", "median", "max")) if w else "-"
        lines.append(f"{v.value:>8} {(w or {}).get('n', 0):>4} {mmm:>20} "
                     f"{(describe(vs) if vs else '(base)'):>30} {_ms(med['tpot_p50_s']):>11} "
                     f"{_ms(med['iteration_s']):>8} {_ms(med['worker_iteration_s']):>9} "
                     f"{(f'{100 * float(np.median(ahead)):.0f}%' if ahead else '-'):>6}")
    c = s["structured_cost"]
    cost = "-" if c["cost"] is None else \
        f"{100 * c['cost']:.1f}% [{100 * c['cost_min']:.1f}%..{100 * c['cost_max']:.1f}%]"
    per_it = s["bitmask_per_iteration_s"]
    lines.append(f"structured_cost (1 - json/plain tok/s, median): {cost}; target < {100 * c['target']:.0f}%: "
                 f"{c['verdict'] or '-'}; per iteration json - plain: gateway {_ms(per_it['iteration_s'], '+.2f')} "
                 f"ms, worker {_ms(per_it['worker_iteration_s'], '+.2f')} ms")
    for r in runs:
        for p in r.get("problems") or []:
            lines.append(f"{r['mode']}#{r['rep']}: {p}")
    hw = report["hardware"]
    lines.append(f"hardware: GPU {hw['gpu'] or '-'} | CPU {hw['cpu_model'] or '-'} x{hw['cpu_cores']}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label, scale in ((axes[0], "output_throughput", "output tok/s (burst makespan)", 1.0),
                                  (axes[1], "worker_iteration_s", "worker iteration (ms, mean)", 1e3)):
        for k, v in enumerate(Variant):
            runs = [r for r in report["runs"] if r["mode"] == v.value and fit(r) and r.get(key) is not None]
            vals = [r[key] * scale for r in runs]
            if vals:
                ax.bar(k, float(np.median(vals)), color=f"C{k}", alpha=0.4)
                ax.scatter([k] * len(vals), vals, color=f"C{k}", zorder=3)
                for r, y in zip(runs, vals):
                    ax.annotate(f"#{r['rep']}", (k, y), xytext=(6, 0), textcoords="offset points", fontsize=8)
        ax.set_xticks(range(len(Variant)), [v.value for v in Variant])
        ax.set_ylabel(label)
    c, cfg = report["summary"]["structured_cost"], report["config"]
    cost = "-" if c["cost"] is None else f"{100 * c['cost']:.1f}% ({c['verdict']})"
    fig.suptitle(f"{cfg['model'] or 'default model'}, {cfg['concurrency']} x {cfg['input_len']}+{cfg['output_len']} "
                 f"tokens: structured cost {cost} on {report['hardware']['gpu'] or 'cpu'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m neo_bench.structured_load", description=__doc__.splitlines()[0])
    srv = ap.add_argument_group("neo serve (one, for both variants)")
    add_serve_arguments(srv)
    srv.add_argument("--offload-mode", default="off", choices=["off", "auto", "full", "throughput"],
                     help="default: %(default)s (GPU only: the bitmask path alone)")
    wl = ap.add_argument_group("load")
    wl.add_argument("--concurrency", type=int, default=64, help="requests per burst, sent at once")
    wl.add_argument("--input-len", type=int, default=256)
    wl.add_argument("--output-len", type=int, default=256, help="max_tokens; every request must reach it")
    wl.add_argument("--reps", type=int, default=3, help="repetitions of both variants, ABBA (>= 3)")
    wl.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    wl.add_argument("--seed", type=int, default=0)
    wl.add_argument("--label", default="run")
    wl.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    if args.reps < 3:
        ap.error("--reps must be >= 3 (a spread needs repetitions)")
    for name in ("concurrency", "input_len", "output_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.vocab <= 100:
        ap.error("--vocab must be > 100 (ids are drawn from 100 up)")
    if not re.fullmatch(r"[\w.-]+", args.label):
        ap.error("--label takes letters, digits, '.', '_' and '-'")
    args.order = [f"{v.value}#{r}" for r, v in abba_order(list(Variant), args.reps)]
    # what start_server reads: one server (tag "load"), no warm-up of its own (ours runs both variants)
    args.variants, args.warmup = {"load": (args.offload_mode, [])}, 0
    return args


def run(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Start the server, warm up both variants, run the ABBA bursts, stop it."""
    def warm_up(server, model: str, info: dict) -> None:
        warm = min(WARMUP_TOKENS, args.output_len)
        for v in Variant:   # graphs, caches, allocator; the json one compiles the grammar (cached after)
            results, _ = asyncio.run(burst(server.url, model, prompts_for(args, args.concurrency, args.seed + 999),
                                           warm, extra_body(v, args.output_len)))
            info[f"warmup_{v.value}_problems"] = problems(results, v, warm)

    return variants_on_one_server(args, Variant, warm_up,
                                  lambda server, model, v, rep: measure(args, server, model, v, rep))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):   # a line per request otherwise (httpx2: the wheel's module name)
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    info, runs = run(args)
    config = {k: v for k, v in vars(args).items() if k not in ("variants", "warmup")}
    report = {"config": {**config, "schema": schema(args.output_len)}, "hardware": hardware(None),
              "order": args.order, "server": info, "runs": runs, "summary": summary(runs)}
    stem = os.path.join(args.out, f"structured_load_{args.label}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    try:   # the JSON is written either way
        plot(report, stem + ".png")
    except ImportError as exc:
        log.warning("no plot (%s)", exc)
    print(table(report))
    failed = bool(info.get("error")) or any(info.get(f"warmup_{v.value}_problems") for v in Variant) \
        or len(runs) != len(args.order) \
        or any(r.get("error") or r.get("failed") or r.get("problems") for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
