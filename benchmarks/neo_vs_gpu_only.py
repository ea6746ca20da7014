"""NEO mode vs GPU-only mode, side by side in one run, under the same GPU KV budget.

For each offload mode (``off``, then ``auto``; ``full`` on request) the script starts its own
``neo serve`` with identical flags except ``--offload-mode`` (and no ``--num-cpu-blocks`` in ``off``:
GPU-only has no host pool), waits for ``/ready``, runs the workload, scrapes ``/metrics`` and stops
the server (SIGTERM to its PID, SIGKILL after a grace). The workload generator is ``neo_bench.serve``
(``sample_lengths``, ``arrival_gaps``, ``one_request``, ``summarize``); every mode gets the same
seeds, hence the same prompts and the same arrival times.

Online part: Poisson arrivals at each rate of ``--rates``; per mode and rate it reports request and
output-token throughput, TTFT / TPOT / ITL p50 and p99, and NEO's normalized per-token latency
(E2E / output tokens) p50 and p99: the paper's per-token latency vs request rate curves.

Offline part (``--offline-prompts N``): all N requests at t=0. The reported throughput is output
tokens per second in a steady-state window. Token arrival times are rebuilt from what
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
used instead (``steady.fallback`` is then true). The
relative offline throughput is NEO's steady-state tok/s over GPU-only's; the whole-run figures
are reported too.

Cost-model prediction (``--cost-tables``, a ``neo profile`` JSON): the steady-state decode
throughput of each mode is estimated with the scheduler's own ``offload_policy.decide``. Every
request is taken at the workload's mean context ``c = mean input + mean output / 2``. GPU-only holds
``n_gpu = min(max_num_seqs, num_gpu_blocks * block_size // c)`` such decodes; NEO adds
``n_cpu = min(max_num_seqs - n_gpu, num_cpu_blocks * block_size // c)`` CPU-resident decodes as
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

from neo_bench.serve import WORKLOADS, arrival_gaps, one_request, sample_lengths, summarize
from neo_common.procs import descendants, serve_port_flags

log = logging.getLogger(__name__)

PAPER = {"paper-a": "+26% (1.26x) on A10G, Llama-3-8B, 1650 GPU blocks",
         "paper-b": "7.5x on T4, Llama-2-7B, 54 GPU blocks"}
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
    "preemptions": ("neo:num_preemptions_total", {}),
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
                 max_num_seqs: int, mode: str = "auto") -> dict:
    """Predicted steady-state decode rows/s of GPU-only and NEO and their ratio (see module docstring)."""
    from neo_gateway.offload_policy import BatchCandidate, decide

    bs = tables.key.block_size
    layers = int(dict(tables.key.shapes)["num_layers"])
    ctx = max(1, int(round(mean_context)))
    n_gpu = min(max_num_seqs, num_gpu_blocks * bs // ctx)
    n_cpu = max(0, min(max_num_seqs - n_gpu, num_cpu_blocks * bs // ctx))
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
def hardware(host_bandwidth_gbs: float | None) -> dict:
    gpu = None
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        gpu = ", ".join(x.strip() for x in res.stdout.splitlines() if x.strip()) or None
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    return {"gpu": gpu, "cpu_model": cpu, "cpu_cores": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)), "host_bandwidth_gbs": host_bandwidth_gbs}


# -- one server per mode -----------------------------------------------------------------------------
def serve_args(args: argparse.Namespace, mode: str, extra: Sequence[str] = ()) -> list[str]:
    """`neo serve` flags for one mode: the common ones, the mode (plus a variant's ``extra`` flags),
    and no host pool when off."""
    flags = {"--model": args.model, "--load-format": args.load_format, "--tokenizer": args.tokenizer,
             "--num-gpu-blocks": args.num_gpu_blocks, "--cpu-threads": args.cpu_threads,
             "--max-model-len": args.max_model_len, "--max-num-seqs": args.max_num_seqs,
             "--max-num-batched-tokens": args.max_num_batched_tokens, "--device": args.device}
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


def run_mode(args: argparse.Namespace, mode: str, rates: list[float]) -> dict:
    """Start the server for one mode (or variant), run warmup, online rates and the offline batch,
    scrape, stop."""
    offload, extra = args.variants.get(mode, (mode, []))
    argv = serve_args(args, offload, extra)
    server = Server(argv, os.path.join(args.out, f"serve_{args.label}_{mode}.log"))
    out: dict = {"mode": mode, "serve_args": argv, "online": [], "offline": None, "metrics": {}, "error": None}
    try:
        t = time.monotonic()
        server.wait_ready(args.ready_timeout)
        out["startup_s"] = time.monotonic() - t
        model = out["served_model"] = server.served_model()
        if args.warmup:
            asyncio.run(send_all(server.url, model, [[100 + i for i in range(16)]] * args.warmup,
                                 [4] * args.warmup, np.zeros(args.warmup)))
        for rate in rates:
            log.info("mode %s: %d requests at rate %g req/s", mode, args.num_prompts, rate)
            results, wall = asyncio.run(send_all(server.url, model, *make_requests(args, args.num_prompts, rate,
                                                                                   args.seed)))
            out["online"].append({"mode": mode, "rate": rate, **summarize(results, wall, {})})
        if args.offline_prompts:
            log.info("mode %s: %d offline requests at t=0", mode, args.offline_prompts)
            peaks: dict = {}
            reqs = make_requests(args, args.offline_prompts, math.inf, args.seed + 1)
            results, wall = asyncio.run(send_all(server.url, model, *reqs, poll=peaks))
            whole = summarize(results, wall, {})
            out["offline"] = {**whole, "steady": steady_window(results),
                              "peak_decoding": {k: peaks.get(k) for k in POLLED}}
        out["metrics"] = summarize_metrics(server.get("/metrics"))
    except Exception as exc:  # one mode failing must not lose the others' results
        log.error("mode %s failed: %s", mode, exc)
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        server.stop(args.stop_grace)
    return out


# -- report ------------------------------------------------------------------------------------------
def compare(modes: dict[str, dict], prediction: dict | None, workload: str) -> dict:
    """Offline throughput of each mode relative to GPU-only, beside the prediction and the paper."""
    def steady(m):
        off = (modes.get(m) or {}).get("offline")
        return off["steady"]["throughput"] if off else None

    base = steady("off")
    relative = {m: (steady(m) / base if base and steady(m) is not None else None) for m in modes}
    return {"offline_relative": relative, "measured_gain": relative.get("auto"),
            "predicted_gain": (prediction or {}).get("gain"), "paper": PAPER.get(workload)}


def _f(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x * scale if scale != 1.0 else x, spec)


def table(report: dict) -> str:
    ms = lambda d, q: _f(d.get(q), ".1f", 1e3)  # noqa: E731
    lines = [f"{'mode':>5} {'rate':>5} {'done':>5} {'fail':>4} {'req/s':>6} {'tok/s':>8} {'TTFT p50/p99 ms':>17} "
             f"{'TPOT p50/p99 ms':>16} {'ITL p50/p99 ms':>15} {'s/tok p50/p99':>14}"]
    for r in report["runs"]:
        lines.append(f"{r['mode']:>5} {r['rate']:>5g} {r['completed']:>5} {r['failed']:>4} "
                     f"{r['request_throughput']:>6.2f} {r['output_throughput']:>8.1f} "
                     f"{ms(r['ttft_s'], 'p50') + '/' + ms(r['ttft_s'], 'p99'):>17} "
                     f"{ms(r['tpot_s'], 'p50') + '/' + ms(r['tpot_s'], 'p99'):>16} "
                     f"{ms(r['itl_s'], 'p50') + '/' + ms(r['itl_s'], 'p99'):>15} "
                     f"{_f(r['normalized_latency_s_per_token'].get('p50'), '.3f')}/"
                     f"{_f(r['normalized_latency_s_per_token'].get('p99'), '.3f'):<6}")
    cmp_ = report["comparison"]
    lines.append(f"\n{'mode':>5} {'offline done':>12} {'fail':>4} {'steady tok/s':>12} {'window s':>13} "
                 f"{'whole tok/s':>11} {'vs off':>7} {'peak dec gpu/cpu':>16}")
    for mode, off in report["offline"].items():
        if not off:
            continue
        st, pk = off["steady"], off["peak_decoding"]
        win = f"{_f(st['t_start'], '.1f')}-{_f(st['t_end'], '.1f')}{'*' if st['fallback'] else ''}"
        lines.append(f"{mode:>5} {off['completed']:>12} {off['failed']:>4} {st['throughput']:>12.1f} {win:>13} "
                     f"{off['output_throughput']:>11.1f} {_f(cmp_['offline_relative'].get(mode), '.3f'):>7} "
                     f"{_f(pk.get('decoding_gpu'), '.0f') + '/' + _f(pk.get('decoding_cpu'), '.0f'):>16}")
    lines.append(f"\n{'mode':>5} {'iters':>7} {'seq/pipe plans':>15} {'swaps out/in':>13} {'iter ms':>8} "
                 f"{'worker ms':>9} {'fwd pred/meas ms':>17} {'pred/meas':>9} {'cpu wait ms':>11}")
    for mode, m in report["metrics"].items():
        fwd = lambda key: _f(m.get(key), ".2f", 1e3)  # noqa: E731
        lines.append(f"{mode:>5} {_f(m.get('iterations'), '.0f'):>7} "
                     f"{_f(m.get('plan_sequential'), '.0f') + '/' + _f(m.get('plan_pipelined'), '.0f'):>15} "
                     f"{_f(m.get('swaps_out'), '.0f') + '/' + _f(m.get('swaps_in'), '.0f'):>13} "
                     f"{_f(m.get('iteration_s'), '.2f', 1e3):>8} {_f(m.get('worker_iteration_s'), '.2f', 1e3):>9} "
                     f"{fwd('forward_predicted_s') + '/' + fwd('forward_measured_s'):>17} "
                     f"{_f(m.get('forward_predicted_over_measured'), '.2f'):>9} {fwd('cpu_wait_s'):>11}")
    p = report["prediction"] or {}
    gain = lambda x: _f(x, ".3f") + ("x" if x is not None else "")  # noqa: E731
    lines.append(f"\ngain of NEO (auto) over GPU-only, offline steady state: measured "
                 f"{gain(cmp_['measured_gain'])} | cost model predicts {gain(cmp_['predicted_gain'])}"
                 f" ({_f(p.get('gpu_decodes'), 'd')} GPU + {_f(p.get('cpu_decodes_hidden'), 'd')}/"
                 f"{_f(p.get('cpu_decodes_offered'), 'd')} CPU decodes at context {_f(p.get('mean_context'), 'd')})"
                 f" | paper: {cmp_['paper'] or '-'}")
    hw = report["hardware"]
    lines.append(f"hardware: GPU {hw['gpu'] or '-'} | CPU {hw['cpu_model'] or '-'} x{hw['cpu_cores']} "
                 f"| host bandwidth {_f(hw['host_bandwidth_gbs'], '.1f')} GB/s")
    return "\n".join(lines)


def plot(report: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mode in report["modes"]:
        runs = [r for r in report["runs"] if r["mode"] == mode and r["completed"]]
        xs = [r["rate"] if math.isfinite(r["rate"]) else r["request_throughput"] for r in runs]
        axes[0].plot(xs, [r["normalized_latency_s_per_token"].get("p50", float("nan")) for r in runs], "o-",
                     label=f"{mode} p50")
        axes[1].plot(xs, [r["output_throughput"] for r in runs], "o-", label=mode)
    axes[0].set_ylabel("per-token latency (s/token)")
    axes[1].set_ylabel("output throughput (tok/s)")
    for ax in axes[:2]:
        ax.set_xlabel("request rate (req/s; inf plotted at achieved)")
        ax.legend()
    offline = [(m, o["steady"]["throughput"]) for m, o in report["offline"].items() if o]
    axes[2].bar([m for m, _ in offline], [v for _, v in offline])
    axes[2].set_ylabel("offline steady-state tok/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m neo_bench.neo_vs_gpu_only", description=__doc__.splitlines()[0])
    srv = ap.add_argument_group("neo serve (same for every mode)")
    srv.add_argument("--model", default=None)
    srv.add_argument("--load-format", default=None)
    srv.add_argument("--tokenizer", default=None)
    srv.add_argument("--num-gpu-blocks", type=int, default=None)
    srv.add_argument("--num-cpu-blocks", type=int, default=None, help="host KV pool (not passed in mode off)")
    srv.add_argument("--cpu-threads", type=int, default=None)
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--max-num-seqs", type=int, default=None)
    srv.add_argument("--max-num-batched-tokens", type=int, default=None)
    srv.add_argument("--device", default=None)
    srv.add_argument("--serve-arg", action="append", default=[],
                     help="extra `neo serve` flag(s), repeatable; write --serve-arg='--flag value'")
    srv.add_argument("--ready-timeout", type=float, default=600.0)
    srv.add_argument("--stop-grace", type=float, default=60.0)
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
    wl.add_argument("--warmup", type=int, default=2, help="short requests before measuring, per mode")
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
    return args


def prediction(args: argparse.Namespace, modes: dict[str, dict]) -> dict | None:
    if not args.cost_tables:
        return None
    from neo_common.cost_model import CostTables

    tables = CostTables.load(args.cost_tables)
    gpu_blocks = args.num_gpu_blocks or ((modes.get("off") or {}).get("metrics") or {}).get("gpu_kv_blocks_total")
    if not gpu_blocks:
        return {"gain": None, "reason": "GPU pool size unknown (no --num-gpu-blocks, no gpu_kv_blocks_total)"}
    inp, outp = mean_lengths(args)
    pred = predict_gain(tables, inp + outp / 2, int(gpu_blocks), args.num_cpu_blocks or 0, args.max_num_seqs or 256)
    return {**pred, "mean_input": inp, "mean_output": outp, "cost_key": tables.key.to_dict()}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",") if r]
    hw = hardware(args.host_bandwidth_gbs)
    modes = {mode: run_mode(args, mode, rates) for mode in args.modes}
    pred = prediction(args, modes)
    report = {
        "config": {k: v for k, v in vars(args).items()},
        "hardware": hw,
        "modes": {m: {k: r[k] for k in ("serve_args", "served_model", "startup_s", "error") if k in r}
                  for m, r in modes.items()},
        "runs": [run for r in modes.values() for run in r["online"]],
        "offline": {m: r["offline"] for m, r in modes.items()},
        "metrics": {m: r["metrics"] for m, r in modes.items()},
        "prediction": pred,
    }
    report["comparison"] = compare(modes, pred, args.workload)
    stem = os.path.join(args.out, f"neo_vs_gpu_only_{args.label}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    plot(report, stem + ".png", f"{args.model or 'default model'} {args.workload}: NEO vs GPU-only {args.label}")
    print(table(report))
    failed = any(r["error"] for r in modes.values()) or any(run["failed"] for run in report["runs"]) \
        or any(o and o["failed"] for o in report["offline"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
