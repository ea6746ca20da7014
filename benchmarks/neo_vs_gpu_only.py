"""NEO mode vs GPU-only mode, side by side in one run, under the same GPU KV budget.

Method (``comparison``): every mode (``off``, ``auto``; ``full`` and variants on request) gets its
own ``neo serve`` with identical flags except ``--offload-mode`` (and no ``--num-cpu-blocks`` in
``off``: GPU-only has no host pool). With ``--live-servers`` (default) all servers start first and
stay up, each warmed up before any measurement; the modes then run ``--reps`` times in ABBA order
(off auto auto off off auto ...), so a drift over the call falls on every mode alike. Within a
repetition every mode gets the same requests (same seeds: prompts, lengths, arrival times; workload
generator ``neo_bench.serve``); each repetition draws new ones, so no live server's prefix cache
serves a repetition what an earlier one computed. The headline is the whole-run (makespan) output throughput of the offline
batch, median over median, with the range of the extremes; overlapping ranges are "no difference".
Servers are stopped by PID (SIGTERM, SIGKILL after a grace). ``--emulate-gpu PRESET`` runs every
server under GPU emulation (docs/design.md, "GPU emulation"); the report says so.

Online part: Poisson arrivals at each rate of ``--rates``; per mode and rate it reports request and
output-token throughput, TTFT / TPOT / ITL p50 and p99, and NEO's normalized per-token latency
(E2E / output tokens) p50 and p99: the paper's per-token latency vs request rate curves.

Offline part (``--offline-prompts N``): all N requests at t=0. The headline is its whole-run
throughput; a secondary column is the output tokens per second in a steady-state window. Token arrival times are rebuilt from what
``one_request`` records (``start + ttft + cumsum(itl)``, one stamp per streamed text chunk). Two
events bound the window:

- ``t_first``: the last request's first token (every request has been admitted; no more ramp-up
  of admissions);
- ``t_done``: the moment the first 10% of requests have finished (the first batch has turned over).

The window is ``[min, max]`` of the two. When the KV budget holds every request at once (typical of
NEO with a large host pool), ``t_first < t_done`` and the window is the span with every request
decoding: after the prefills, before the batch starts to drain. When the GPU pool holds only some
of them (GPU-only under memory pressure), ``t_done < t_first`` and the window is the churn phase in
which finishing requests are replaced by waiting ones at a full batch: after the initial fill,
before the drain that starts once the queue is empty. Either way the ramp-up and the drain tail,
whose lengths depend on N rather than on the engine, are left out. If the window is empty or holds
under 10% of the run's tokens (a handful of requests: no steady phase to speak of) the whole run is
used instead (``steady.fallback`` is then true). The window flatters whichever mode front-loads
its prefills, which is why it is not the headline.

Cost-model prediction (``--cost-tables``, a ``neo profile`` JSON): the steady-state decode
throughput of each mode is estimated with the scheduler's own ``offload_policy.decide``. Every
request is taken at the workload's mean context ``c = mean input + mean output / 2``. GPU-only holds
``n_gpu = min(cap, num_gpu_blocks * block_size // c)`` such decodes, ``cap`` being ``max_num_seqs``
or the offline batch if smaller; NEO adds ``n_cpu = min(cap - n_gpu, num_cpu_blocks * block_size // c)``
CPU-resident decodes as
``cpu_decode_lens`` and ``decide(..., "auto")`` keeps those it can hide (or keeps the sequential
plan). Rows per second = ``rows / (layer_s * num_layers)``; the predicted gain is NEO's over
GPU-only's. Prefill cost is ignored (decodes dominate both workloads' GPU time; prefill would add
the same work to both modes and only dilute the gain). Without ``--num-gpu-blocks`` the GPU pool
size is read from GPU-only's ``neo:gpu_kv_blocks_total`` gauge.

    python -m neo_bench.neo_vs_gpu_only --model llama-3-8b --load-format dummy --tokenizer .gpu/tokenizer \\
        --workload paper-a --num-gpu-blocks 1650 --num-cpu-blocks 20000 --rates 1,2,4 --num-prompts 100 \\
        --offline-prompts 200 --cost-tables cost.json --host-bandwidth-gbs 100 --out DIR --label a

Prints a table, writes ``<out>/neo_vs_gpu_only_<label>.json`` and ``.png``; exits 1 if any request
failed or a mode's server did not come up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

from neo_bench import neo_report
from neo_bench.comparison import abba_order
from neo_bench.serve import WORKLOADS, arrival_gaps, one_request, sample_lengths, summarize
from neo_common.procs import descendants, serve_port_flags

log = logging.getLogger(__name__)

STEADY_DONE_FRACTION = 0.10
STEADY_MIN_TOKEN_FRACTION = 0.10  # a window with fewer of the run's tokens is no steady state
SCRAPED = {  # report key -> (metric name, labels)
    "plan_sequential": ("neo:iteration_plan_total", {"plan": "sequential"}),
    "plan_pipelined": ("neo:iteration_plan_total", {"plan": "pipelined"}),
    "swaps_out": ("neo:swaps_total", {"direction": "out"}),
    "swaps_in": ("neo:swaps_total", {"direction": "in"}),
    "decoding_gpu": ("neo:num_requests_decoding", {"place": "gpu"}),
    "decoding_cpu": ("neo:num_requests_decoding", {"place": "cpu"}),
    "gpu_kv_blocks_total": ("neo:gpu_kv_blocks_total", {}),
    "preemptions": ("vllm:num_preemptions_total", {}),
}
MEANS = {  # report key -> histogram name (mean = _sum / _count)
    "iteration_s": "neo:iteration_duration_seconds",
    "worker_iteration_s": "neo:worker_iteration_seconds",
    "forward_predicted_s": "neo:forward_predicted_seconds",
    "forward_measured_s": "neo:forward_measured_seconds",
    "cpu_wait_s": "neo:cpu_attention_wait_seconds",   # per iteration with CPU rows: the pipeline balance
}
POLLED = ("decoding_gpu", "decoding_cpu")  # gauges whose peak during the offline run is kept


# -- Prometheus text ---------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of a Prometheus text exposition: name -> [(labels, value)]; comments and junk skipped."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m or line.startswith("#"):
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        out.setdefault(m.group(1), []).append((labels, value))
    return out


def metric_value(samples: dict, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels``; None if there is none."""
    hits = [v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in (labels or {}).items())]
    return float(sum(hits)) if hits else None


def histogram_mean(samples: dict, name: str) -> float | None:
    total, count = metric_value(samples, name + "_sum"), metric_value(samples, name + "_count")
    return total / count if total is not None and count else None


def summarize_metrics(text: str) -> dict:
    """The per-mode figures of the report from one scrape; absent metrics are None."""
    s = parse_prometheus(text)
    out = {key: metric_value(s, name, labels) for key, (name, labels) in SCRAPED.items()}
    out.update({key: histogram_mean(s, name) for key, name in MEANS.items()})
    out["iterations"] = metric_value(s, "neo:iteration_duration_seconds_count")
    pred, meas = out["forward_predicted_s"], out["forward_measured_s"]
    out["forward_predicted_over_measured"] = pred / meas if pred is not None and meas else None
    return out


# -- steady-state window -----------------------------------------------------------------------------
def token_times(result: dict) -> np.ndarray:
    """Absolute arrival times of one request's streamed tokens (start + ttft + cumsum(itl))."""
    if result.get("error") is not None or result.get("ttft") is None:
        return np.zeros(0)
    first = result["start"] + result["ttft"]
    return first + np.concatenate([[0.0], np.cumsum(np.asarray(result["itl"], dtype=float))])


def steady_window(results: list[dict], done_fraction: float = STEADY_DONE_FRACTION) -> dict:
    """Output tok/s between the last first token and the first ``done_fraction`` finishes (see docstring)."""
    ok = [r for r in results if r.get("error") is None and r.get("ttft") is not None]
    if not ok:
        return {"t_start": None, "t_end": None, "tokens": 0, "duration_s": 0.0, "throughput": 0.0,
                "fallback": True}
    stamps = [token_times(r) for r in ok]
    ends = sorted(r["start"] + r["e2e"] for r in ok)
    t_first = max(s[0] for s in stamps)
    t_done = ends[max(1, math.ceil(done_fraction * len(ok))) - 1]
    lo, hi = min(t_first, t_done), max(t_first, t_done)
    every = np.concatenate(stamps)
    tokens = int(((every >= lo) & (every <= hi)).sum())
    fallback = hi <= lo or tokens < STEADY_MIN_TOKEN_FRACTION * every.size
    if fallback:
        lo, hi = min(r["start"] for r in ok), ends[-1]
        tokens = int(every.size)
    t0 = min(r["start"] for r in ok)
    return {"t_start": lo - t0, "t_end": hi - t0, "tokens": tokens, "duration_s": hi - lo,
            "throughput": tokens / (hi - lo) if hi > lo else 0.0, "fallback": fallback}


# -- cost-model prediction ---------------------------------------------------------------------------
def mean_lengths(args: argparse.Namespace, n: int = 2000) -> tuple[float, float]:
    """Mean input and output length of the workload (sampled like the runs)."""
    lengths = sample_lengths(argparse.Namespace(**{**vars(args), "num_prompts": n}), np.random.default_rng(0))
    ins, outs = zip(*lengths)
    return float(np.mean(ins)), float(np.mean(outs))


def predict_gain(tables, mean_context: float, num_gpu_blocks: int, num_cpu_blocks: int,
                 max_num_seqs: int, mode: str = "auto", num_requests: int | None = None) -> dict:
    """Predicted steady-state decode rows/s of GPU-only and NEO and their ratio (see module docstring).
    ``num_requests`` caps the decodes of both modes (a batch of 32 requests never puts 38 on the CPU)."""
    from neo_gateway.offload_policy import BatchCandidate, decide

    bs = tables.key.block_size
    layers = int(dict(tables.key.shapes)["num_layers"])
    ctx = max(1, int(round(mean_context)))
    cap = max_num_seqs if num_requests is None else min(max_num_seqs, num_requests)
    n_gpu = min(cap, num_gpu_blocks * bs // ctx)
    n_cpu = max(0, min(cap - n_gpu, num_cpu_blocks * bs // ctx))
    out = {"mean_context": ctx, "block_size": bs, "num_layers": layers, "gpu_decodes": n_gpu,
           "cpu_decodes_offered": n_cpu, "gpu_only_tok_s": None, "neo_tok_s": None, "gain": None,
           "cpu_decodes_hidden": 0, "plan": None, "reason": ""}
    if n_gpu == 0:
        out["reason"] = "the GPU KV budget holds no request of mean context"
        return out
    base = decide(BatchCandidate(gpu_decode_lens=[ctx] * n_gpu), tables, "off")
    neo = decide(BatchCandidate(gpu_decode_lens=[ctx] * n_gpu, cpu_decode_lens=[ctx] * n_cpu), tables, mode)
    base_rate = base.rows / (base.layer_s * layers)
    neo_rate = neo.rows / (neo.layer_s * layers)
    out.update(gpu_only_tok_s=base_rate, neo_tok_s=neo_rate, gain=neo_rate / base_rate,
               cpu_decodes_hidden=n_cpu - len(neo.cpu_waiting), plan=neo.kind.name.lower(), reason=neo.reason)
    return out


# -- hardware ----------------------------------------------------------------------------------------
def cpu_model() -> str | None:
    """The host CPU's model name (``/proc/cpuinfo``), None where that file is not."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        return None


def hardware(host_bandwidth_gbs: float | None) -> dict:
    gpu = None
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        gpu = ", ".join(x.strip() for x in res.stdout.splitlines() if x.strip()) or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"gpu": gpu, "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)), "host_bandwidth_gbs": host_bandwidth_gbs}


# -- one server per mode -----------------------------------------------------------------------------
def add_serve_arguments(group, cpu_blocks_help: str = "host KV pool") -> None:
    """The `neo serve` flags a benchmark passes to the servers it starts (``serve_args``), plus how
    long to wait for them; the caller adds ``--offload-mode`` with its own choices."""
    for flag in ("--model", "--load-format", "--tokenizer", "--device"):
        group.add_argument(flag, default=None)
    group.add_argument("--emulate-gpu", default=None, help="passed to every server: GPU emulation preset")
    group.add_argument("--num-cpu-blocks", type=int, default=None, help=cpu_blocks_help)
    for flag in ("--num-gpu-blocks", "--cpu-threads", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens"):
        group.add_argument(flag, type=int, default=None)
    group.add_argument("--serve-arg", action="append", default=[],
                       help="extra `neo serve` flag(s), repeatable; write --serve-arg='--flag value'")
    group.add_argument("--ready-timeout", type=float, default=600.0)
    group.add_argument("--stop-grace", type=float, default=60.0)


def serve_args(args: argparse.Namespace, mode: str, extra: Sequence[str] = ()) -> list[str]:
    """`neo serve` flags for one mode: the common ones, the mode (plus a variant's ``extra`` flags),
    and no host pool when off."""
    flags = {"--model": args.model, "--load-format": args.load_format, "--tokenizer": args.tokenizer,
             "--num-gpu-blocks": args.num_gpu_blocks, "--cpu-threads": args.cpu_threads,
             "--max-model-len": args.max_model_len, "--max-num-seqs": args.max_num_seqs,
             "--max-num-batched-tokens": args.max_num_batched_tokens, "--device": args.device,
             "--emulate-gpu": args.emulate_gpu}
    if mode != "off":
        flags["--num-cpu-blocks"] = args.num_cpu_blocks
    out = [x for k, v in flags.items() if v is not None for x in (k, str(v))]
    passed = [x for a in args.serve_arg for x in a.split()]
    return out + serve_port_flags(8, passed) + passed + ["--offload-mode", mode, *extra]


class Server:
    """One `neo serve` process tree; stopped by PID (SIGTERM, then SIGKILL after ``grace``)."""

    def __init__(self, argv: list[str], log_path: str) -> None:
        # the caller picks the port with the other ports (or passes its own, as --port N or --port=N)
        self.port = int(next(a.partition("=")[2] or argv[k + 1] for k, a in enumerate(argv)
                             if a == "--port" or a.startswith("--port=")))
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "neo_common.cli", "serve", *argv]
        log.info("starting %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"neo serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"neo serve not ready after {timeout:.0f}s:\n{self.tail()}")

    def get(self, path: str) -> str:
        import httpx

        return httpx.get(self.url + path, timeout=30).text

    def served_model(self) -> str:
        return json.loads(self.get("/v1/models"))["data"][0]["id"]

    def tail(self, n: int = 30) -> str:
        with open(self.log_path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")

    def stop(self, grace: float = 60.0) -> None:
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("neo serve (pid %d) ignored SIGTERM for %.0fs; killing it", self.proc.pid, grace)
                self.proc.kill()
                self.proc.wait()
        for pid in tree:  # children the launcher did not reap (only if it was killed)
            try:
                os.kill(pid, signal.SIGKILL)
                log.warning("killed leftover child %d of neo serve", pid)
            except OSError:
                pass
        self.log.close()


# -- workload ----------------------------------------------------------------------------------------
def make_requests(args: argparse.Namespace, n: int, rate: float, seed: int):
    """Prompts, output lengths and arrival gaps; drawn in `neo bench`'s order, so a seed gives its requests."""
    rng = np.random.default_rng(seed)
    lengths = sample_lengths(argparse.Namespace(**{**vars(args), "num_prompts": n}), rng)
    prompts = [rng.integers(100, args.vocab, k).tolist() for k, _ in lengths]
    return prompts, [o for _, o in lengths], arrival_gaps(rate, args.burstiness, n, rng)


async def send_all(url: str, model: str, prompts, out_lens, gaps, poll: dict | None = None) -> tuple[list, float]:
    """Send the requests at their gaps; returns the raw `one_request` results and the wall time."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    poller = asyncio.create_task(_poll_gauges(url, poll)) if poll is not None else None
    tasks = []
    t0 = time.perf_counter()
    for prompt, out_len, gap in zip(prompts, out_lens, gaps):
        await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one_request(client, model, prompt, out_len)))
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    if poller:
        poller.cancel()
    await client.close()
    return list(results), wall


async def _poll_gauges(url: str, peaks: dict) -> None:
    """Keep the peak of the per-place decoding gauges while a run is in flight (1 s period)."""
    import httpx

    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            try:
                m = summarize_metrics((await http.get(url + "/metrics")).text)
                for key in POLLED:
                    if m[key] is not None:
                        peaks[key] = max(peaks.get(key) or 0.0, m[key])
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1.0)


def start_server(args: argparse.Namespace, mode: str, tag: str = "") -> tuple[Server, dict]:
    """Start the server of one mode (or variant), wait until ready, warm it up."""
    offload, extra = args.variants.get(mode, (mode, []))
    argv = serve_args(args, offload, extra)
    server = Server(argv, os.path.join(args.out, f"serve_{args.label}_{mode}{tag}.log"))
    info: dict = {"mode": mode, "serve_args": argv, "error": None}
    t = time.monotonic()
    server.wait_ready(args.ready_timeout)
    info["startup_s"] = time.monotonic() - t
    model = info["served_model"] = server.served_model()
    if args.warmup:   # short requests, then a slice of the real workload: graphs, caches, allocator
        asyncio.run(send_all(server.url, model, [[100 + i for i in range(16)]] * args.warmup,
                             [4] * args.warmup, np.zeros(args.warmup)))
        prompts, outs, gaps = make_requests(args, max(1, args.offline_prompts // 10), math.inf, args.seed + 999)
        asyncio.run(send_all(server.url, model, prompts, [min(o, 16) for o in outs], gaps))
    return server, info


def variants_on_one_server(args: argparse.Namespace, variants, warm_up, measure_one) -> tuple[dict, list[dict]]:
    """One `neo serve` (``start_server``'s tag "load") for variants that differ per request only:
    ``warm_up(server, model, info)`` once, then ``measure_one(server, model, variant, rep)`` in ABBA
    order; a failed run is recorded as an ``error`` entry, a server that never came up as the info's
    ``error``. Returns (server info, runs); the server is stopped either way."""
    try:
        server, info = start_server(args, "load")
    except Exception as exc:  # noqa: BLE001 (reported, exit 1)
        log.error("neo serve did not come up: %s", exc)
        return {"error": f"{type(exc).__name__}: {exc}"}, []
    runs: list[dict] = []
    try:
        model = info["served_model"]
        warm_up(server, model, info)
        for rep, v in abba_order(list(variants), args.reps):
            try:
                runs.append(measure_one(server, model, v, rep))
            except Exception as exc:  # noqa: BLE001
                log.error("rep %d variant %s failed: %s", rep, v.value, exc)
                runs.append({"mode": v.value, "rep": rep, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        server.stop(args.stop_grace)
    return info, runs


def measure(args: argparse.Namespace, server: Server, model: str, mode: str, rep: int, rates: list[float]) -> dict:
    """One repetition of one mode: the offline batch (whole-run makespan and the steady window),
    then each online rate. Every mode gets the same requests in a repetition; each repetition
    draws new prompts (seeds offset by the repetition), so the prefix cache of a live server never
    serves a later repetition what an earlier one computed."""
    seed = args.seed + 1000 * rep
    out: dict = {"mode": mode, "rep": rep, "online": [], "offline": None}
    if args.offline_prompts:
        log.info("rep %d mode %s: %d offline requests at t=0", rep, mode, args.offline_prompts)
        peaks: dict = {}
        reqs = make_requests(args, args.offline_prompts, math.inf, seed + 1)
        results, wall = asyncio.run(send_all(server.url, model, *reqs, poll=peaks))
        whole = summarize(results, wall, {})
        out["offline"] = {**whole, "makespan_s": wall, "steady": steady_window(results),
                          "peak_decoding": {k: peaks.get(k) for k in POLLED}}
    for rate in rates:
        log.info("rep %d mode %s: %d requests at rate %g req/s", rep, mode, args.num_prompts, rate)
        results, wall = asyncio.run(send_all(server.url, model, *make_requests(args, args.num_prompts, rate, seed)))
        out["online"].append({"mode": mode, "rep": rep, "rate": rate, **summarize(results, wall, {})})
    return out


def run_all(args: argparse.Namespace, rates: list[float], measure=measure) -> tuple[dict[str, dict], list[dict],
                                                                                   dict[str, dict]]:
    """Every mode ``--reps`` times in ABBA order (``comparison.abba_order``), each run by ``measure``
    (another benchmark passes its own workload, e.g. benchmarks/prefix_cache.py). With ``--live-servers``
    every mode's server is started (and warmed up) once, before any measurement, and stays up;
    otherwise each repetition starts (and warms up) a fresh server. Returns the servers' info,
    the measured runs in run order, and each mode's last metrics scrape."""
    infos: dict[str, dict] = {}
    runs: list[dict] = []
    scraped: dict[str, dict] = {}
    live: dict[str, tuple[Server, str]] = {}
    try:
        if args.live_servers:
            for mode in args.modes:
                try:
                    server, info = start_server(args, mode)
                    live[mode] = (server, info["served_model"])
                except Exception as exc:  # noqa: BLE001 (one mode failing must not lose the others)
                    info = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"}
                    log.error("mode %s failed to start: %s", mode, exc)
                infos[mode] = info
        for rep, mode in abba_order(args.modes, args.reps):
            if args.live_servers:
                if mode not in live:
                    continue
                server, model = live[mode]
                fresh = None
            else:
                try:
                    fresh, info = start_server(args, mode, f"_rep{rep}")
                except Exception as exc:  # noqa: BLE001
                    log.error("rep %d mode %s failed to start: %s", rep, mode, exc)
                    infos.setdefault(mode, {"mode": mode, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                infos.setdefault(mode, info)
                server, model = fresh, info["served_model"]
            try:
                runs.append(measure(args, server, model, mode, rep, rates))
                scraped[mode] = summarize_metrics(server.get("/metrics"))
                # each run's figures as soon as it ends: a benchmark stopped part-way keeps them
                log.info("measured rep %d mode %s: %s", rep, mode, json.dumps(runs[-1], default=str))
            except Exception as exc:  # noqa: BLE001
                log.error("rep %d mode %s failed: %s", rep, mode, exc)
                runs.append({"mode": mode, "rep": rep, "error": f"{type(exc).__name__}: {exc}", "online": [],
                             "offline": None})
            finally:
                if fresh is not None:
                    fresh.stop(args.stop_grace)
    finally:
        for server, _ in live.values():
            server.stop(args.stop_grace)
    return infos, runs, scraped


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m neo_bench.neo_vs_gpu_only", description=__doc__.splitlines()[0])
    srv = ap.add_argument_group("neo serve (same for every mode)")
    add_serve_arguments(srv, "host KV pool (not passed in mode off)")
    wl = ap.add_argument_group("workload")
    wl.add_argument("--modes", default="off,auto", help="comma list of off, auto, full")
    wl.add_argument("--variant", action="append", default=[],
                    help="another mode to run after --modes, with extra serve flags: 'LABEL=MODE:FLAGS', e.g. "
                         "'auto-eager=auto:--pipeline-graphs false' (repeatable)")
    wl.add_argument("--workload", default="paper-a", choices=["fixed", "uniform", *WORKLOADS])
    wl.add_argument("--input-len", type=int, default=512)
    wl.add_argument("--output-len", type=int, default=128)
    wl.add_argument("--range-ratio", type=float, default=0.1)
    wl.add_argument("--num-prompts", type=int, default=100, help="requests per online rate")
    wl.add_argument("--rates", default="1,2,4", help="comma list of request rates (req/s); inf = all at once")
    wl.add_argument("--burstiness", type=float, default=1.0)
    wl.add_argument("--offline-prompts", type=int, default=200, help="requests sent at t=0 (0: no offline part)")
    wl.add_argument("--warmup", type=int, default=2, help="short requests before measuring, per server (then a "
                                                          "tenth of the offline batch with short outputs)")
    wl.add_argument("--reps", type=int, default=3, help="repetitions of every mode, interleaved ABBA")
    wl.add_argument("--live-servers", action=argparse.BooleanOptionalAction, default=True,
                    help="start every mode's server once and keep them all up (they share the GPU; each KV "
                         "budget must fit beside the others); --no-live-servers starts a fresh one per run")
    wl.add_argument("--slo-tpot-ms", type=float, default=200.0, help="p99 TPOT SLO of the max-rate figure")
    wl.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    wl.add_argument("--seed", type=int, default=0)
    pr = ap.add_argument_group("prediction and report")
    pr.add_argument("--cost-tables", default=None, help="`neo profile` JSON for the predicted gain")
    pr.add_argument("--host-bandwidth-gbs", type=float, default=None, help="from `neo probe-bandwidth`")
    pr.add_argument("--label", default="run")
    pr.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= {"off", "auto", "full", "throughput"}:
        ap.error("--modes takes off, auto, full, throughput")
    args.variants = {}
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        mode, _, flags = rest.partition(":")
        if (not re.fullmatch(r"[\w.-]+", label) or label in args.modes or label in args.variants
                or mode not in ("off", "auto", "full", "throughput")):
            ap.error(f"--variant {spec!r}: write LABEL=MODE:FLAGS with a new label of letters, digits, '.', '_' "
                     "or '-' and MODE one of off, auto, full, throughput")
        args.variants[label] = (mode, flags.split())
    args.modes += list(args.variants)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    args.order = [f"{m}#{r}" for r, m in abba_order(args.modes, args.reps)]
    return args


def prediction(args: argparse.Namespace, scraped: dict[str, dict]) -> dict | None:
    if not args.cost_tables:
        return None
    from neo_common.cost_model import CostTables

    tables = CostTables.load(args.cost_tables)
    gpu_blocks = args.num_gpu_blocks or (scraped.get("off") or {}).get("gpu_kv_blocks_total")
    if not gpu_blocks:
        return {"gain": None, "reason": "GPU pool size unknown (no --num-gpu-blocks, no gpu_kv_blocks_total)"}
    inp, outp = mean_lengths(args)
    pred = predict_gain(tables, inp + outp / 2, int(gpu_blocks), args.num_cpu_blocks or 0, args.max_num_seqs or 256,
                        num_requests=args.offline_prompts or None)
    return {**pred, "mean_input": inp, "mean_output": outp, "cost_key": tables.key.to_dict()}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--replot":   # JSON files of earlier runs -> their PNG and table
        for path in argv[1:]:
            with open(path) as f:
                report = json.load(f)
            neo_report.plot(report, path.removesuffix(".json") + ".png",
                            f"{report['config']['model'] or 'default model'} {report['config']['workload']}: "
                            f"NEO vs GPU-only {report['config']['label']}")
            print(neo_report.table(report))
        return 0
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",") if r]
    hw = hardware(args.host_bandwidth_gbs)
    if args.emulate_gpu:
        from neo_common.gpu_presets import preset

        hw["gpu_label"] = preset(args.emulate_gpu).label(hw["gpu"] or "cpu")
    infos, runs, scraped = run_all(args, rates)
    pred = prediction(args, scraped)
    report = {"config": {k: v for k, v in vars(args).items()}, "hardware": hw, "order": args.order,
              "modes": infos, "runs": runs, "metrics": scraped, "prediction": pred,
              "summary": neo_report.summary(runs, args.modes, args.slo_tpot_ms / 1e3)}
    report["headline"] = neo_report.headline(report)
    stem = os.path.join(args.out, f"neo_vs_gpu_only_{args.label}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    try:   # the JSON is written; a host without matplotlib re-plots it with `--replot`
        neo_report.plot(report, stem + ".png", f"{args.model or 'default model'} {args.workload}: NEO vs "
                                               f"GPU-only {args.label}")
    except ImportError as exc:
        log.warning("no plot (%s); re-plot with: python -m neo_bench.neo_vs_gpu_only --replot %s.json", exc, stem)
    print(neo_report.table(report))
    failed = any(i.get("error") for i in infos.values()) or any(r.get("error") for r in runs) \
        or any(o["failed"] for r in runs for o in r["online"]) or any((r["offline"] or {}).get("failed") for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
