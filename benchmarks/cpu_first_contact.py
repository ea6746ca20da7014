"""First contact: the embedded default through `neo serve` on a CPU machine, beside transformers' `generate`.

What a newcomer runs first is `neo serve` with no model flag: the embedded SmolLM2-135M-Instruct
GGUF, on whatever CPU the machine has. The peer is what they would otherwise run: transformers'
``generate`` over the same file (transformers' own GGUF loader dequantizes it to float32, as the
worker does), in this process, with torch's default threads (``--hf-threads`` to pick them), on the same machine.

Modes, all on the same prompt of ``--input-len`` token ids, each producing exactly
``--output-len`` tokens greedily (``min_new_tokens`` / ``ignore_eos``):

- ``hf_1``: one ``generate`` call (``do_sample=False``, the default dynamic KV cache);
- ``neo_1``: one streaming completion through the official OpenAI client
  (``neo_bench.serve.one_request``) against one live `neo serve` started once for the whole run;
- ``neo_N``: ``--streams`` such completions sent at once; the figure is their aggregate.

The figure is output tokens per second of the whole request, prefill included (tokens / wall time
from the send, or the call, to the last token). The method is ``neo_bench.comparison``'s: one
warm-up run of every mode, then ``--reps`` repetitions with the modes interleaved in ABBA order
(``abba_order``), so a drift in the machine's load falls on every mode alike; each mode's figure is
reported as min / median / max, each ratio as median over median with the range of the extremes,
"no difference" when the ranges overlap (``verdict``). The goals checked: ``neo_1`` at least
``--goal-single`` times ``hf_1``, and ``neo_N`` at least ``--goal-streams`` times ``neo_1``. The
1-minute load average is recorded before every run: on a shared machine it says how much of the
CPU the runs had.

    python -m neo_bench.cpu_first_contact --reps 3 --out docs/benchmarks/cpu_first_contact

Prints a table; writes ``<out>/cpu_first_contact.json`` (every run, the spreads, the verdicts, the
hardware: ``lscpu``'s model name and core count, torch and transformers versions) and ``.png``.
Exits 1 if a run failed or produced other than the requested number of tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import subprocess
import time

import numpy as np

from neo_bench.comparison import Spread, abba_order, describe, verdict
from neo_bench.neo_vs_gpu_only import Server, send_all
from neo_bench.peer_transformers import timed_generate
from neo_common.procs import serve_port_flags

log = logging.getLogger(__name__)


def lscpu() -> dict:
    """The CPU's model name and core count as ``lscpu`` reports them (and the CPUs this process may use)."""
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    except (OSError, subprocess.SubprocessError):
        pass
    get = lambda k: fields.get(k, "").strip() or None  # noqa: E731
    return {"model_name": get("Model name"), "cpus": get("CPU(s)"), "cores_per_socket": get("Core(s) per socket"),
            "threads_per_core": get("Thread(s) per core"), "sockets": get("Socket(s)"),
            "usable_cpus": len(os.sched_getaffinity(0))}


def versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "python": platform.python_version()}


# -- transformers ------------------------------------------------------------------------------------
def load_hf(gguf: str):
    """transformers' model of the GGUF (its own loader, float32), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32)
    log.info("transformers loaded %s in %.1fs", os.path.basename(gguf), time.perf_counter() - t0)
    return model.eval()


def hf_run(model, prompt: list[int], output_len: int) -> dict:
    import torch

    wall, made = timed_generate(model, torch.tensor([prompt]), output_len, "cpu")
    return {"wall_s": wall, "tokens": made, "tok_s": made / wall,
            "error": None if made == output_len else f"generated {made} tokens, not {output_len}"}


# -- neo serve ---------------------------------------------------------------------------------------
def neo_run(server: Server, model: str, prompt: list[int], output_len: int, streams: int) -> dict:
    results, wall = asyncio.run(send_all(server.url, model, [prompt] * streams, [output_len] * streams,
                                         np.zeros(streams)))
    tokens = sum(r["tokens"] for r in results if r["error"] is None)
    errors = [r["error"] for r in results if r["error"]]
    out = {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "error": None,
           "ttft_s": float(np.median([r["ttft"] for r in results if r["ttft"] is not None] or [np.nan]))}
    if errors or tokens != streams * output_len:
        out["error"] = f"{len(errors)} of {streams} failed, {tokens} of {streams * output_len} tokens; {errors[:2]}"
    return out


# -- the run -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    from neo_common.model_source import embedded_gguf_path

    prompt = np.random.default_rng(args.seed).integers(100, 32000, args.input_len).tolist()
    neo_modes = {"neo_1": 1, f"neo_{args.streams}": args.streams}
    modes = ([] if args.skip_hf else ["hf_1"]) + list(neo_modes)
    hf = None if args.skip_hf else load_hf(embedded_gguf_path())
    if args.hf_threads:   # this process's torch: transformers' side only (the worker is another process)
        import torch

        torch.set_num_threads(args.hf_threads)
    extra = shlex.split(args.serve_args)
    server = Server(serve_port_flags(1, extra) + extra, os.path.join(args.out, "serve.log"))
    runs: list[dict] = []
    try:
        server.wait_ready(args.ready_timeout)
        served = server.served_model()

        def one(mode: str) -> dict:
            load = os.getloadavg()[0]
            res = (hf_run(hf, prompt, args.output_len) if mode == "hf_1"
                   else neo_run(server, served, prompt, args.output_len, neo_modes[mode]))
            return {"mode": mode, "load_1m": load, **res}

        for mode in modes:   # warm-up: first calls, lazy packing and allocation
            log.info("warm-up %s: %.2f tok/s", mode, one(mode)["tok_s"])
        for rep, mode in abba_order(modes, args.reps):
            r = one(mode)
            runs.append({"rep": rep, **r})
            log.info("rep %d %-6s %6.2f tok/s (%.2fs, load %.1f)%s", rep, mode, r["tok_s"], r["wall_s"],
                     r["load_1m"], f" ERROR {r['error']}" if r["error"] else "")
    finally:
        server.stop(args.stop_grace)
    return report(args, modes, runs)


def report(args: argparse.Namespace, modes: list[str], runs: list[dict]) -> dict:
    spread = {m: Spread.of(r["tok_s"] for r in runs if r["mode"] == m and not r["error"]) for m in modes}
    many = f"neo_{args.streams}"
    verdicts = {"neo_1_vs_hf_1": verdict(spread.get("neo_1"), spread.get("hf_1")),
                f"{many}_vs_neo_1": verdict(spread.get(many), spread.get("neo_1"))}
    goals = {"neo_1_vs_hf_1": args.goal_single, f"{many}_vs_neo_1": args.goal_streams}
    for key, v in verdicts.items():
        v["goal"] = goals[key]
        v["met"] = None if v["ratio"] is None else v["ratio"] >= goals[key]
    loads = [r["load_1m"] for r in runs]
    return {"config": vars(args), "hardware": {"lscpu": lscpu(), **versions()}, "runs": runs,
            "spread": {m: (s.to_dict() if s else None) for m, s in spread.items()}, "verdicts": verdicts,
            "load_1m": Spread.of(loads).to_dict() if loads else None}


def table(rep: dict) -> str:
    lines = [f"{'mode':>8} {'n':>2} {'tok/s min / median / max':>26}"]
    for m, s in rep["spread"].items():
        lines.append(f"{m:>8} {s['n'] if s else 0:>2} " + (f"{s['min']:8.2f} {s['median']:8.2f} {s['max']:8.2f}"
                                                          if s else f"{'-':>26}"))
    for key, v in rep["verdicts"].items():
        lines.append(f"{key}: {describe(v)} (goal >= {v['goal']}x: {'met' if v['met'] else 'NOT met'})")
    hw, load = rep["hardware"], rep["load_1m"] or {}
    lines.append(f"{hw['lscpu']['model_name']}, {hw['lscpu']['cpus']} CPUs | torch {hw['torch']} | transformers "
                 f"{hw['transformers']} on {hw['torch_threads']} threads | 1-min load average "
                 f"{load.get('min', 0):.1f}-{load.get('max', 0):.1f}")
    return "\n".join(lines)


def plot(rep: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, s in rep["spread"].items() if s]
    med = [rep["spread"][m]["median"] for m in modes]
    lo = [rep["spread"][m]["median"] - rep["spread"][m]["min"] for m in modes]
    hi = [rep["spread"][m]["max"] - rep["spread"][m]["median"] for m in modes]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(modes, med, yerr=[lo, hi], capsize=6, color=["#888", "#1f77b4", "#2ca02c"][:len(modes)])
    for run in rep["runs"]:
        if not run["error"]:
            ax.plot(modes.index(run["mode"]), run["tok_s"], "k.", alpha=0.6)
    ax.set_ylabel("output tokens/s (median, min-max, each run a dot)")
    c, hw = rep["config"], rep["hardware"]["lscpu"]
    ax.set_title(f"embedded SmolLM2-135M, {c['input_len']}+{c['output_len']} tokens, {hw['model_name']} "
                 f"x{hw['cpus']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m neo_bench.cpu_first_contact", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams of the aggregate mode")
    ap.add_argument("--serve-args", default="", help="extra `neo serve` flags, one string (shlex-split)")
    ap.add_argument("--goal-single", type=float, default=1.2)
    ap.add_argument("--goal-streams", type=float, default=4.0)
    ap.add_argument("--skip-hf", action="store_true", help="the engine's modes only")
    ap.add_argument("--hf-threads", type=int, default=0,
                    help="torch threads of transformers' side (0: torch's default, the cores); on a loaded "
                         "machine one thread can be faster than two")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--stop-grace", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.hf_threads < 0 or args.input_len < 1 or args.output_len < 1 or args.streams < 2:
        ap.error("--reps, --input-len and --output-len must be positive, --streams at least 2")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rep = run(args)
    stem = os.path.join(args.out, "cpu_first_contact")
    with open(stem + ".json", "w") as f:
        json.dump(rep, f, indent=2, default=str)
    plot(rep, stem + ".png")
    print(table(rep))
    return 1 if any(r["error"] for r in rep["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
