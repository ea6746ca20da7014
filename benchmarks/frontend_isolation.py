"""Whether a busy API server slows the engine core: one burst quiet, the same burst under frontend load.

The gateway is two processes: the API server (HTTP, tokenization, detokenization, SSE) and the engine
core (scheduler, worker links) in a child process. The claim measured here: the core's iterations
do not slow down when the API server is busy (issue: core overhead per iteration beyond the GPU step
< 1%, TPOT p50 unchanged while 1,000 idle connections and a stream of 1 MB prompts hit the API
server). One `neo serve` (``neo_vs_gpu_only.start_server``) serves both variants:

- ``quiet``:  a burst of ``--concurrency`` streamed completions sent at once, prompts of
  ``--input-len`` random token ids, ``max_tokens = --output-len``, ``ignore_eos``;
- ``loaded``: the same burst while a background load, in a process of its own (so it takes no GIL
  from the burst's client), hits the API server:

  * ``--idle-connections`` raw TCP connections (``asyncio.open_connection``), each sending one tiny
    ``GET /ready`` (HTTP/1.1, keep-alive), reading its answer, then holding the connection open and
    silent: idle connections the API server keeps in its event loop that never reach the engine
    (no batch slot, no KV block). The server closes idle keep-alive connections after its
    ``--keep-alive-s`` (5 s by default), so the server is started with ``--keep-alive-s
    --idle-keep-alive-s`` (default 3600); a connection the server closes anyway is reopened and
    counted as dropped. (The other way, a request's headers then a body sent slowly, would be cut
    by the server's ``--body-timeout-s`` after 30 s.)
  * one loop posting ``--big-prompt-bytes`` of text (ASCII words, so bytes = characters) to
    ``/v1/completions`` back to back, ``max_tokens`` 1, each prompt different. Such a prompt exceeds
    the context: it is refused with 400, either by the API server's bound on characters per token
    before tokenization (the message says "at least N tokens ... characters") or after tokenizing
    it whole; a prompt the context holds would be prefilled, i.e. engine load, so any 200 is
    reported. Every status is counted, with one sample message each.

  The load starts before the measurement (every connection open, one big prompt answered), runs
  through the whole burst, and stops after it; a connection dropped or a big prompt that failed
  at the transport level makes the run unfit.

Per run: TPOT p50, output tok/s over the burst's makespan, and the engine core's per-iteration
overhead ``1 - worker / wall`` over the burst's iterations (``/metrics`` before and after,
``neo_bench.overhead`` with ``since``), with the mean core and worker iteration times. After a
warm-up burst of each variant, the variants run ``--reps`` times in ABBA order (``comparison``);
per variant, median [min-max] of each figure; "no difference" when the two ranges overlap.

    python -m neo_bench.frontend_isolation --model llama-3-8b --load-format dummy --tokenizer .gpu/tokenizer \\
        --num-gpu-blocks 9000 --max-num-seqs 256 --concurrency 256 --input-len 128 --output-len 256 --out DIR

Prints a table (last), writes ``<out>/frontend_isolation_<label>.json`` and ``.png``; exits 1 if the
server did not come up, a burst request failed or did not produce exactly ``--output-len`` tokens,
or the background load did not run through a loaded burst.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import enum
import json
import logging
import multiprocessing
import os
import re
import resource
import sys
import time
from urllib.parse import urlsplit

import numpy as np

from neo_bench.comparison import Spread, abba_order, describe, spread_bars, summarize_modes
from neo_bench.neo_vs_gpu_only import add_serve_arguments, hardware, variants_on_one_server
from neo_bench.overhead import overhead
from neo_bench.serve import one_request, summarize

log = logging.getLogger(__name__)

TARGET_OVERHEAD = 0.01     # the issue: the core's per-iteration overhead beyond the worker's step < 1%
WARMUP_TOKENS = 16
LOAD_READY_TIMEOUT_S = 300.0
LOAD_STOP_TIMEOUT_S = 60.0
IDLE_PATH = "/ready"       # the idle connections' one request: answered by the API server alone
_WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
          "dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea "
          "commodo consequat").split()


class Variant(str, enum.Enum):
    QUIET = "quiet"
    LOADED = "loaded"


FIGURES = {  # report key -> the figure of one run
    "tpot_p50_s": lambda r: r["tpot_s"].get("p50"),
    "output_throughput": lambda r: r["output_throughput"],
    "overhead_fraction": lambda r: r["overhead_fraction"],
    "iteration_s": lambda r: r["iteration_s"],
    "worker_iteration_s": lambda r: r["worker_iteration_s"],
}


# -- the background load (its own process) ------------------------------------------------------------
def prompt_text(nbytes: int, seed: int) -> str:
    """``nbytes`` of ASCII words (bytes = characters), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    words = rng.choice(_WORDS, size=nbytes // 4 + 1)
    return " ".join(words)[:nbytes]


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (headers and a ``Content-Length`` body); its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return int(parts[1])


class LoadState:
    """Counters of the background load; ``snapshot`` is what the parent gets."""

    def __init__(self, connections: int, big_prompt_bytes: int = 0) -> None:
        self.connections_requested = connections
        self.big_prompt_bytes = big_prompt_bytes
        self.connections_open = 0
        self.connections_opened = 0      # every successful open, reopenings included
        self.connections_dropped = 0     # closed by the server while held
        self.connect_errors = 0
        self.big_prompts_sent = 0
        self.big_prompts_done = 0
        self.big_prompt_errors = 0       # transport errors (no HTTP status)
        self.big_prompt_statuses: collections.Counter = collections.Counter()
        self.big_prompt_messages: dict[str, str] = {}
        self.big_prompt_latency_s: list[float] = []
        self.last_error: str | None = None

    def snapshot(self) -> dict:
        lat = self.big_prompt_latency_s
        return {"t": time.time(), "connections_requested": self.connections_requested,
                "big_prompt_bytes": self.big_prompt_bytes, "connections_open": self.connections_open, "connections_opened": self.connections_opened,
                "connections_dropped": self.connections_dropped, "connect_errors": self.connect_errors,
                "big_prompts_sent": self.big_prompts_sent, "big_prompts_done": self.big_prompts_done,
                "big_prompt_errors": self.big_prompt_errors,
                "big_prompt_statuses": {str(k): v for k, v in sorted(self.big_prompt_statuses.items())},
                "big_prompt_messages": dict(self.big_prompt_messages),
                "big_prompt_latency_s": {"p50": float(np.median(lat)), "max": float(max(lat))} if lat else {},
                "last_error": self.last_error}


async def _open_idle(host: str, port: int, request: bytes):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        status = await read_response(reader)
        if status != 200:
            raise ValueError(f"{IDLE_PATH} answered {status}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def hold_connection(host: str, port: int, state: LoadState, stop: asyncio.Event,
                          gate: asyncio.Semaphore | None = None) -> None:
    """One idle keep-alive connection: open it, one ``GET IDLE_PATH``, then silence until ``stop``;
    reopened (after 0.2 s) if the server closes it or the open fails. ``gate`` bounds the opens
    in progress at once (the listen backlog is then never the limit)."""
    request = f"GET {IDLE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    gate = gate or asyncio.Semaphore(1)
    while not stop.is_set():
        try:
            async with gate:
                reader, writer = await _open_idle(host, port, request)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            state.connect_errors += 1
            state.last_error = f"idle connection: {type(exc).__name__}: {exc}"
            await asyncio.sleep(0.2)
            continue
        state.connections_open += 1
        state.connections_opened += 1
        closed = asyncio.ensure_future(reader.read(1))   # b"" (EOF) when the server closes it
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            state.connections_open -= 1
            for t in (closed, stopped):
                t.cancel()
            writer.close()
        if not stop.is_set():
            state.connections_dropped += 1
            state.last_error = "a held connection was closed by the server"
            await asyncio.sleep(0.2)


async def big_prompts(url: str, model: str, nbytes: int, state: LoadState) -> None:
    """Post ``nbytes`` text prompts to /v1/completions back to back (cancelled to stop)."""
    import httpx

    text = prompt_text(nbytes, seed=1)
    async with httpx.AsyncClient(timeout=600) as http:
        k = 0
        while True:
            tag = f"{k} "   # each prompt different (no cache of any kind serves one)
            body = json.dumps({"model": model, "prompt": tag + text[len(tag):], "max_tokens": 1}).encode()
            state.big_prompts_sent += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/completions", content=body,
                                    headers={"content-type": "application/json"})
                state.big_prompt_statuses[r.status_code] += 1
                state.big_prompt_messages.setdefault(str(r.status_code), r.text[:300])
                state.big_prompt_latency_s.append(time.perf_counter() - t0)
            except httpx.HTTPError as exc:
                state.big_prompt_errors += 1
                state.last_error = f"big prompt: {type(exc).__name__}: {exc}"
                await asyncio.sleep(0.2)
            state.big_prompts_done += 1
            k += 1


async def _load(url: str, model: str, connections: int, nbytes: int, conn) -> None:
    loop = asyncio.get_running_loop()
    split = urlsplit(url)
    state, stop = LoadState(connections, nbytes), asyncio.Event()
    gate = asyncio.Semaphore(64)
    holders = [asyncio.create_task(hold_connection(split.hostname, split.port, state, stop, gate))
               for _ in range(connections)]
    prompts = asyncio.create_task(big_prompts(url, model, nbytes, state)) if nbytes else None
    deadline = time.monotonic() + LOAD_READY_TIMEOUT_S
    while state.connections_open < connections or (prompts and state.big_prompts_done < 1):
        if time.monotonic() > deadline:
            conn.send(("error", state.snapshot()))
            break
        await asyncio.sleep(0.05)
    else:
        conn.send(("ready", state.snapshot()))
    await loop.run_in_executor(None, conn.recv)   # the parent's "stop"
    end = state.snapshot()
    stop.set()
    if prompts:
        prompts.cancel()
    await asyncio.gather(*holders, *([prompts] if prompts else []), return_exceptions=True)
    conn.send(("stopped", end))


def load_main(url: str, model: str, connections: int, nbytes: int, conn) -> None:
    """The background load process's entry point (``multiprocessing``, spawned)."""
    _raise_fd_limit()
    asyncio.run(_load(url, model, connections, nbytes, conn))


class BackgroundLoad:
    """The load process: ``start`` returns once it runs (or raises), ``stop`` its counters at the stop."""

    def __init__(self, url: str, model: str, connections: int, nbytes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=load_main, args=(url, model, connections, nbytes, child), daemon=True)

    def start(self) -> dict:
        self.proc.start()
        if not self.conn.poll(LOAD_READY_TIMEOUT_S + 60):
            self.kill()
            raise TimeoutError("the background load did not report")
        kind, snap = self.conn.recv()
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"the background load did not come up: {json.dumps(snap)[:600]}")
        return snap

    def stop(self) -> dict | None:
        snap = None
        try:
            self.conn.send("stop")
            if self.conn.poll(LOAD_STOP_TIMEOUT_S):
                _, snap = self.conn.recv()
        except (OSError, EOFError):
            pass
        self.proc.join(LOAD_STOP_TIMEOUT_S)
        self.kill()
        return snap

    def kill(self) -> None:
        if self.proc.is_alive():
            log.warning("background load (pid %s) did not stop; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.join()


def load_figures(start: dict, end: dict | None) -> dict:
    """What the load did over one burst, from its counters at the burst's start and end."""
    if end is None:
        return {"start": start, "end": None, "during": None}
    during = {k: end[k] - start[k] for k in ("connections_dropped", "connect_errors", "big_prompts_sent",
                                             "big_prompts_done", "big_prompt_errors")}
    during["big_prompt_statuses"] = {k: v - start["big_prompt_statuses"].get(k, 0)
                                     for k, v in end["big_prompt_statuses"].items()
                                     if v - start["big_prompt_statuses"].get(k, 0)}
    during["seconds"] = end["t"] - start["t"]
    return {"start": start, "end": end, "during": during}


def load_problems(load: dict) -> list[str]:
    """Why the background load did not run through the burst (empty: it did)."""
    start, end, during = load["start"], load["end"], load["during"]
    want = start["connections_requested"]
    out = []
    if end is None:
        return ["the background load's counters at the burst's end are missing"]
    for when, snap in (("start", start), ("end", end)):
        if snap["connections_open"] != want:
            out.append(f"{snap['connections_open']} of {want} idle connections open at the burst's {when}")
    if during["connections_dropped"]:
        out.append(f"{during['connections_dropped']} idle connections dropped by the server during the burst")
    if during["big_prompt_errors"]:
        out.append(f"{during['big_prompt_errors']} big prompts failed during the burst ({end['last_error']})")
    if start["big_prompt_bytes"] and end["big_prompts_sent"] <= start["big_prompts_done"]:
        out.append("no big prompt was in flight during the burst")
    return out


# -- one burst ---------------------------------------------------------------------------------------
async def burst(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> tuple[list, float]:
    """Every prompt at once; the results and the burst's makespan."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_request(client, model, p, max_tokens) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    return list(results), wall


def problems(results: list[dict], max_tokens: int) -> list[str]:
    """What makes a burst unfit (at most 5 distinct): a failed request, or one not of ``max_tokens``."""
    out = []
    for r in results:
        if r["error"]:
            out.append(r["error"])
        elif r["finish_reason"] != "length" or r["tokens"] != max_tokens:
            out.append(f"finish_reason {r['finish_reason']!r} after {r['tokens']} tokens (asked {max_tokens})")
    return sorted(set(out))[:5]


def iteration_figures(before: str, after: str) -> dict:
    """The core's mean iteration and the worker's between two scrapes, and ``1 - worker / wall``."""
    try:
        o = overhead(after, since=before)
    except ValueError:   # no iteration in between (or no such histograms)
        return {"iteration_s": None, "worker_iteration_s": None, "iterations": 0, "overhead_fraction": None}
    return {"iteration_s": o["wall_ms"] / 1e3, "worker_iteration_s": o["worker_ms"] / 1e3,
            "iterations": o["iterations"], "overhead_fraction": o["overhead_fraction"]}


def prompts_for(args: argparse.Namespace, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, args.vocab, args.input_len).tolist() for _ in range(args.concurrency)]


def measured_burst(args: argparse.Namespace, server, model: str, seed: int, max_tokens: int) -> dict:
    before = server.get("/metrics")
    results, wall = asyncio.run(burst(server.url, model, prompts_for(args, seed), max_tokens))
    after = server.get("/metrics")
    return {**summarize(results, wall, {}), **iteration_figures(before, after),
            "problems": problems(results, max_tokens)}


def measure(args: argparse.Namespace, server, model: str, variant: Variant, rep: int,
            max_tokens: int | None = None) -> dict:
    """One burst of ``variant`` (rep -1: the warm-up, ``max_tokens`` short); its own prompts."""
    seed = args.seed + 1000 * (rep + 1) + list(Variant).index(variant)
    max_tokens = max_tokens or args.output_len
    log.info("rep %d variant %s: %d requests at once, %d tokens each", rep, variant.value, args.concurrency,
             max_tokens)
    if variant is Variant.QUIET:
        return {"mode": variant.value, "rep": rep, **measured_burst(args, server, model, seed, max_tokens)}
    load = BackgroundLoad(server.url, model, args.idle_connections, args.big_prompt_bytes)
    start = load.start()
    try:
        run = measured_burst(args, server, model, seed, max_tokens)
    finally:
        end = load.stop()
    figures = load_figures(start, end)
    run = {"mode": variant.value, "rep": rep, **run, "load": figures}
    run["problems"] = run["problems"] + load_problems(figures)
    return run


# -- report ------------------------------------------------------------------------------------------
def fit(run: dict) -> bool:
    return not run.get("error") and not run.get("problems")


def compare(figure: dict) -> dict:
    """loaded against quiet for one figure: medians, the gap, and "no difference" when the ranges overlap."""
    q, ld = (figure["spread"].get(v.value) for v in Variant)
    if q is None or ld is None:
        return {"gap": None, "verdict": None}
    a, b = Spread(**q), Spread(**ld)
    verdict = "no difference" if a.overlaps(b) else ("higher under load" if b.median > a.median
                                                     else "lower under load")
    return {"gap": b.median - a.median, "verdict": verdict}


def summary(runs: list[dict]) -> dict:
    ok = {v.value: [r for r in runs if r["mode"] == v.value and fit(r)] for v in Variant}
    out = {key: {**summarize_modes(ok, fig, Variant.QUIET.value)} for key, fig in FIGURES.items()}
    for key in FIGURES:
        out[key]["loaded_vs_quiet"] = compare(out[key])
    out["overhead_target"] = {
        "target": TARGET_OVERHEAD,
        **{v.value: (None if not (s := out["overhead_fraction"]["spread"].get(v.value))
                     else "met" if s["median"] < TARGET_OVERHEAD else "missed") for v in Variant}}
    isolated = [out[k]["loaded_vs_quiet"]["verdict"] for k in ("tpot_p50_s", "overhead_fraction")]
    out["verdict"] = None if None in isolated else \
        "no difference" if all(x == "no difference" for x in isolated) else "difference"
    return out


def _mmm(s: dict | None, scale: float, spec: str) -> str:
    if not s:
        return "-"
    return f"{s['median'] * scale:{spec}} [{s['min'] * scale:{spec}}-{s['max'] * scale:{spec}}]"


def table(report: dict) -> str:
    s, runs = report["summary"], report["runs"]
    cols = (("tpot_p50_s", "TPOT p50 ms", 1e3, ".2f"), ("output_throughput", "tok/s", 1.0, ".1f"),
            ("overhead_fraction", "overhead %", 100.0, ".2f"), ("iteration_s", "core iter ms", 1e3, ".2f"),
            ("worker_iteration_s", "worker ms", 1e3, ".2f"))
    lines = [f"{'variant':>8} {'reps':>4} " + " ".join(f"{title:>24}" for _, title, _, _ in cols)]
    for v in Variant:
        n = (s["tpot_p50_s"]["spread"].get(v.value) or {}).get("n", 0)
        lines.append(f"{v.value:>8} {n:>4} " + " ".join(f"{_mmm(s[k]['spread'].get(v.value), sc, sp):>24}"
                                                        for k, _, sc, sp in cols))
    parts = []
    for key, title, scale, spec in cols[:3]:
        c = s[key]["loaded_vs_quiet"]
        gap = "-" if c["gap"] is None else f"{c['gap'] * scale:+{spec}}"
        ratio = describe(s[key]["vs_quiet"].get(Variant.LOADED.value) or {})
        parts.append(f"{title} {gap} ({c['verdict'] or '-'}; {ratio})")
    lines.append("loaded - quiet, median: " + "; ".join(parts))
    t = s["overhead_target"]
    lines.append(f"core overhead target < {100 * t['target']:.0f}%: quiet {t['quiet'] or '-'}, loaded "
                 f"{t['loaded'] or '-'}; frontend isolation (TPOT p50 and overhead ranges overlap): "
                 f"{s['verdict'] or '-'}")
    for r in runs:
        load = r.get("load")
        if load and load["end"]:
            d, e = load["during"], load["end"]
            statuses = ", ".join(f"{k}: {v}" for k, v in d["big_prompt_statuses"].items()) or "none answered"
            lat = e["big_prompt_latency_s"].get("p50")
            lines.append(f"load {r['mode']}#{r['rep']}: idle connections open {load['start']['connections_open']}"
                         f"/{e['connections_requested']} at start, {e['connections_open']} at end, "
                         f"{d['connections_dropped']} dropped; big prompts {d['big_prompts_sent']} sent during the "
                         f"burst ({statuses}), p50 {'-' if lat is None else f'{lat * 1e3:.0f}'} ms each")
    for r in runs:
        for p in r.get("problems") or []:
            lines.append(f"{r['mode']}#{r['rep']}: {p}")
        if r.get("error"):
            lines.append(f"{r['mode']}#{r['rep']}: {r['error']}")
    hw = report["hardware"]
    lines.append(f"hardware: GPU {hw['gpu'] or '-'} | CPU {hw['cpu_model'] or '-'} x{hw['cpu_cores']}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    panels = (("tpot_p50_s", "TPOT p50 (ms)", 1e3), ("output_throughput", "output tok/s (burst makespan)", 1.0),
              ("overhead_fraction", "core overhead per iteration (%)", 100.0))
    for ax, (key, label, scale) in zip(axes, panels):
        values = {v.value: [FIGURES[key](r) for r in report["runs"]
                            if r["mode"] == v.value and fit(r) and FIGURES[key](r) is not None] for v in Variant}
        spread_bars(ax, report["summary"][key]["spread"], values, label, scale)
    cfg, s = report["config"], report["summary"]
    fig.suptitle(f"{cfg['model'] or 'default model'}, {cfg['concurrency']} x {cfg['input_len']}+{cfg['output_len']} "
                 f"tokens; loaded: {cfg['idle_connections']} idle connections + {cfg['big_prompt_bytes']} B prompts: "
                 f"{s['verdict'] or '-'} ({report['hardware']['gpu'] or 'cpu'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------------
def _raise_fd_limit() -> None:
    """The soft open-files limit up to the hard one: the idle connections need a descriptor each, here
    and in the server (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m neo_bench.frontend_isolation", description=__doc__.splitlines()[0])
    srv = ap.add_argument_group("neo serve (one, for both variants)")
    add_serve_arguments(srv)
    srv.add_argument("--offload-mode", default="off", choices=["off", "auto", "full", "throughput"],
                     help="default: %(default)s")
    srv.add_argument("--idle-keep-alive-s", type=float, default=3600.0,
                     help="the server's --keep-alive-s: long enough that it keeps the idle connections open")
    wl = ap.add_argument_group("burst")
    wl.add_argument("--concurrency", type=int, default=64, help="requests per burst, sent at once")
    wl.add_argument("--input-len", type=int, default=256)
    wl.add_argument("--output-len", type=int, default=256, help="max_tokens; every request must reach it")
    wl.add_argument("--reps", type=int, default=3, help="repetitions of both variants, ABBA (3 or more for a spread)")
    wl.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    wl.add_argument("--seed", type=int, default=0)
    bg = ap.add_argument_group("background load (the loaded variant)")
    bg.add_argument("--idle-connections", type=int, default=1000, help="idle keep-alive connections held open")
    bg.add_argument("--big-prompt-bytes", type=int, default=1 << 20,
                    help="text prompt size posted back to back (0: none)")
    out = ap.add_argument_group("output")
    out.add_argument("--label", default="run")
    out.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    for name in ("concurrency", "input_len", "output_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("idle_connections", "big_prompt_bytes"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.vocab <= 100:
        ap.error("--vocab must be > 100 (ids are drawn from 100 up)")
    if not re.fullmatch(r"[\w.-]+", args.label):
        ap.error("--label takes letters, digits, '.', '_' and '-'")
    args.order = [f"{v.value}#{r}" for r, v in abba_order(list(Variant), args.reps)]
    # what start_server reads: one server (tag "load"), no warm-up of its own (ours runs both variants)
    extra = ["--keep-alive-s", f"{args.idle_keep_alive_s:g}"]
    need = args.idle_connections + args.concurrency + 64
    if need > 2048:   # neo serve's default --max-connections
        extra += ["--max-connections", str(need)]
    args.variants, args.warmup = {"load": (args.offload_mode, extra)}, 0
    return args


def run(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Start the server, warm up both variants, run the ABBA bursts, stop it."""
    def warm_up(server, model: str, info: dict) -> None:
        for v in Variant:   # graphs, caches, allocator; the load's paths too
            try:
                w = measure(args, server, model, v, -1, min(WARMUP_TOKENS, args.output_len))
                info[f"warmup_{v.value}_problems"] = w["problems"]
            except Exception as exc:  # noqa: BLE001
                info[f"warmup_{v.value}_problems"] = [f"{type(exc).__name__}: {exc}"]

    return variants_on_one_server(args, Variant, warm_up,
                                  lambda server, model, v, rep: measure(args, server, model, v, rep))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):   # a line per request otherwise (httpx2: the wheel's module name)
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    _raise_fd_limit()
    info, runs = run(args)
    config = {k: v for k, v in vars(args).items() if k not in ("variants", "warmup")}
    report = {"config": config, "hardware": hardware(None), "order": args.order, "server": info, "runs": runs,
              "summary": summary(runs)}
    stem = os.path.join(args.out, f"frontend_isolation_{args.label}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    try:   # the JSON is written either way
        plot(report, stem + ".png")
    except ImportError as exc:
        log.warning("no plot (%s)", exc)
    print(table(report))
    failed = bool(info.get("error")) or any(info.get(f"warmup_{v.value}_problems") for v in Variant) \
        or len(runs) != len(args.order) or any(r.get("error") or r.get("failed") or r.get("problems") for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
