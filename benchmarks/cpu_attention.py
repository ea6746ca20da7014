"""CPU decode-attention benchmark: host read bandwidth vs the kernel's KV bandwidth, and handoff latency.

One run measures, with one thread count:
1. host memory read bandwidth (STREAM-style read, the kernel's own pool and SIMD code), before and
   after the kernel sweep (the best is the reference: on a shared machine it is the quiet figure);
2. the kernel's achieved KV bandwidth (K+V bytes read / time, best and median of reps) for
   Llama-3-8B shapes (32 q heads, 8 KV heads, head_dim 128, bf16, block 16, scattered block tables)
   at batch x context; combinations whose pool would exceed --max-gb are skipped and listed;
3. handoff latency through the real segment and native service loop: a second process serves
   (iteration, layer) jobs of near-empty work (1 row, 1 token; iterations of 32 layers, the Python
   step between iterations included); this process rings the doorbell and spins on completion;
   p50/p99 of ring -> done seen.
Prints a table; writes cpu_attention.json and cpu_attention.png under --out.

    python benchmarks/cpu_attention.py --out docs/benchmarks/cpu_attention/<host>
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid

import numpy as np

from neo_common.host_kernel import _native, kernel
from neo_common.host_kernel.cpus import available_cpus
from neo_cpu_attention.membw import cpu_model
from neo_common.enums import KvDtypeCode
from neo_common.segment import ABORT_OFF, KvSegment, SegmentLayout, job_seq
from neo_cpu_attention.slots import SlotDesc

HQ, HKV, D, BS = 32, 8, 128, 16   # Llama-3-8B attention geometry


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 8.0


def fill_bf16(a: np.ndarray, rng: np.random.Generator) -> None:
    """Fill with N(0,1) bf16 bit patterns, tiling a 4 MiB random chunk (fast for multi-GB pools)."""
    flat = a.reshape(-1)
    chunk = (rng.standard_normal(2 << 20, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    for i in range(0, flat.size, chunk.size):
        n = min(chunk.size, flat.size - i)
        flat[i:i + n] = chunk[:n]


def bench_kernel(batch: int, ctx: int, reps: int, min_s: float, rng: np.random.Generator) -> dict:
    nb = (ctx + BS - 1) // BS
    num_blocks = batch * nb
    k_cache = np.empty((num_blocks, HKV, BS, D), np.uint16)
    v_cache = np.empty_like(k_cache)
    fill_bf16(k_cache, rng)
    fill_bf16(v_cache, rng)
    bt = rng.permutation(num_blocks).astype(np.int32).reshape(batch, nb)
    lens = np.full(batch, ctx, np.int32)
    q = np.empty((batch, HQ, D), np.uint16)
    k_new = np.empty((batch, HKV, D), np.uint16)
    v_new = np.empty((batch, HKV, D), np.uint16)
    for a in (q, k_new, v_new):
        fill_bf16(a, rng)
    out = np.empty((batch, HQ, D), np.uint16)
    kernel.attend(q, k_cache, v_cache, bt, lens, k_new=k_new, v_new=v_new, out=out)  # warm-up
    times: list[float] = []
    cpu_times: list[float] = []   # process CPU seconds / threads: immune to being descheduled
    threads = kernel.get_num_threads()
    t_end = time.perf_counter() + min_s
    while len(times) < reps or time.perf_counter() < t_end:
        c0, t0 = time.process_time(), time.perf_counter()
        kernel.attend(q, k_cache, v_cache, bt, lens, k_new=k_new, v_new=v_new, out=out)
        times.append(time.perf_counter() - t0)
        cpu_times.append((time.process_time() - c0) / threads)
        if len(times) >= 200:
            break
    kv_bytes = 2 * batch * ctx * HKV * D * 2
    best, med = min(times), statistics.median(times)
    return {"batch": batch, "ctx": ctx, "kv_bytes": kv_bytes, "reps": len(times),
            "ms_best": best * 1e3, "ms_median": med * 1e3,
            "gbps_best": kv_bytes / best / 1e9, "gbps_median": kv_bytes / med / 1e9,
            "gbps_cpu_best": kv_bytes / max(min(cpu_times), 1e-9) / 1e9}


# -- handoff latency -------------------------------------------------------------------------------
def handoff_child(name: str, jobs: int, threads: int) -> int:
    """Serve near-empty jobs on slot 0 through the native service loop: iterations 1.. of all layers."""
    kernel.set_num_threads(threads)
    seg = KvSegment.attach(name, timeout_s=30, populate=True)
    lay = seg.layout
    lens = np.ones(1, np.int32)
    bt = np.zeros((1, 1), np.int32)
    slot = SlotDesc.for_slot(seg, 0, lens, bt)
    print("ATTACHED", flush=True)
    rc = 0
    for it in range(1, jobs // lay.num_layers + 1):
        rc, *_ = _native.serve_iteration(seg.address("k_pool"), seg.address("v_pool"), seg.base_address + ABORT_OFF,
                                         lay.num_layers, lay.num_blocks, lay.num_q_heads, lay.num_kv_heads,
                                         lay.head_dim, lay.block_size, KvDtypeCode[lay.dtype], lay.attn_scale, it,
                                         [slot], 1_000_000, 30_000_000)
        if rc:
            break
    seg.close()
    return 0 if rc == 0 else 1


def bench_handoff(jobs: int, threads: int) -> tuple[dict, list[float]]:
    name = f"neo-bench-{uuid.uuid4().hex[:8]}"
    layers = 32   # jobs run as iterations of 32 layers, as in serving (pool pages stay mapped)
    jobs = max(1, jobs // layers) * layers
    layout = SegmentLayout(num_layers=layers, num_blocks=4, num_kv_heads=HKV, num_q_heads=HQ, head_dim=D,
                           block_size=BS, max_rows=1, num_slots=1)
    seg = KvSegment.create(name, layout)
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--handoff-child", name,
                              str(jobs), str(threads)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ATTACHED"
        done_addr = seg.base_address + layout.done_off(0)
        req_addr = seg.base_address + layout.req_off(0)
        lat = []
        for job in range(jobs):
            seq = job_seq(1 + job // layers, job % layers)
            t0 = time.perf_counter_ns()
            _native.store_u64(req_addr, seq)
            _, flag = _native.wait_u64(done_addr, seq, 10_000_000, 30_000_000)
            t1 = time.perf_counter_ns()
            if flag:
                raise TimeoutError(f"job {job} not served")
            lat.append((t1 - t0) / 1e3)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        seg.close()
        seg.unlink()
    warm = sorted(lat[min(100, jobs // 10):])   # the first jobs include the child's start-up
    summary = {"jobs": len(warm), "child_threads": threads, "p50_us": warm[len(warm) // 2],
               "p99_us": warm[int(len(warm) * 0.99)], "mean_us": statistics.fmean(warm), "min_us": warm[0]}
    return summary, warm


# -- report ----------------------------------------------------------------------------------------
def plot(result: dict, samples_us: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    read = result["read_gbps"]["best"]
    rows = [r for r in result["kernel"] if "gbps_best" in r]
    for batch in sorted({r["batch"] for r in rows}):
        pts = sorted((r["ctx"], r["gbps_best"]) for r in rows if r["batch"] == batch)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {batch}")
    ax.axhline(read, color="k", ls="--", label=f"host read {read:.1f} GB/s")
    ax.axhline(0.85 * read, color="gray", ls=":", label="85% target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("KV GB/s (best)")
    ax.set_title(f"CPU decode attention, Llama-3-8B shapes, {result['host']['threads']} threads")
    ax.legend(fontsize=8)
    h = result["handoff"]
    ax2.hist(samples_us, bins=60, range=(0, max(5 * h["p50_us"], h["p99_us"] * 1.2)))
    ax2.axvline(h["p50_us"], color="k", ls="--", label=f"p50 {h['p50_us']:.1f} us")
    ax2.axvline(h["p99_us"], color="r", ls=":", label=f"p99 {h['p99_us']:.1f} us")
    ax2.set_xlabel("doorbell -> completion (us)")
    ax2.set_title("handoff latency (near-empty job, two processes)")
    ax2.legend()
    fig.suptitle(f"{result['host']['cpu_model']} ({result['host']['isa']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--handoff-child"]:
        return handoff_child(argv[1], int(argv[2]), int(argv[3]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out/cpu_attention")
    p.add_argument("--threads", type=int, default=0, help="0: the CPUs this process may use")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--contexts", default="512,2048,8192")
    p.add_argument("--max-gb", type=float, default=0.0,
                   help="largest K+V pool of one combination (0: 40%% of MemAvailable)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.5, help="keep repeating a combination this long")
    p.add_argument("--read-mb", type=int, default=1024)
    p.add_argument("--handoff-jobs", type=int, default=3000)
    p.add_argument("--handoff-threads", type=int, default=0, help="0: threads - 1 (one core for the ringer)")
    args = p.parse_args(argv)

    threads = kernel.set_num_threads(args.threads or available_cpus())
    max_gb = args.max_gb or 0.4 * mem_available_gb()
    rng = np.random.default_rng(0)
    load_start = os.getloadavg()
    read_start, read_cpu_start = _native.measure_read(args.read_mb << 20, 5)
    print(f"{cpu_model()}: {threads} threads, ISA {kernel.isa()}, read {read_start:.1f} GB/s, "
          f"load avg {load_start[0]:.1f}", flush=True)

    rows = []
    for batch in map(int, args.batches.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            need = 2 * batch * ctx * HKV * D * 2 / 2**30
            if need > max_gb:
                rows.append({"batch": batch, "ctx": ctx, "skipped": f"pool {need:.1f} GiB > --max-gb {max_gb:.1f}"})
                print(f"  batch {batch:4d} ctx {ctx:5d}: skipped ({rows[-1]['skipped']})", flush=True)
                continue
            r = bench_kernel(batch, ctx, args.reps, args.min_seconds, rng)
            rows.append(r)
            print(f"  batch {batch:4d} ctx {ctx:5d}: {r['ms_best']:9.3f} ms  {r['gbps_best']:6.1f} GB/s best, "
                  f"{r['gbps_median']:6.1f} median", flush=True)

    read_end, read_cpu_end = _native.measure_read(args.read_mb << 20, 5)
    read_best = max(read_start, read_end)
    read_cpu = max(read_cpu_start, read_cpu_end)
    kernel.set_num_threads(threads)
    hthreads = args.handoff_threads or max(1, threads - 1)
    handoff, samples = bench_handoff(args.handoff_jobs, hthreads)
    load_end = os.getloadavg()

    for r in rows:
        if "gbps_best" in r:
            r["fraction_of_read"] = r["gbps_best"] / read_best
            r["cpu_fraction_of_read"] = r["gbps_cpu_best"] / read_cpu
            r["floor_ms"] = r["kv_bytes"] / (read_best * 1e9) * 1e3
    target_rows = [r for r in rows if "gbps_best" in r and r["batch"] >= 16 and r["ctx"] >= 2048]
    result = {
        "host": {"cpu_model": cpu_model(), "threads": threads, "isa": kernel.isa(),
                 "machine": platform.machine(), "python": platform.python_version(),
                 "loadavg_start": load_start, "loadavg_end": load_end,
                 "mem_available_gb": round(mem_available_gb(), 1)},
        "shapes": {"num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "block_size": BS, "dtype": "bfloat16"},
        "read_gbps": {"start": read_start, "end": read_end, "best": read_best, "size_mb": args.read_mb,
                      "cpu_normalized_best": read_cpu},
        "kernel": rows,
        "handoff": handoff,
        "targets": {
            "kernel_min_fraction_batch16_ctx2048": min((r["fraction_of_read"] for r in target_rows), default=None),
            "kernel_min_cpu_fraction_batch16_ctx2048": min((r["cpu_fraction_of_read"] for r in target_rows),
                                                           default=None),
            "kernel_target": 0.85,
            "handoff_p50_us": handoff["p50_us"],
            "handoff_target_us": 20.0,
        },
    }
    print()
    print(f"{'batch':>5} {'ctx':>6} {'KV MiB':>9} {'ms best':>9} {'floor ms':>9} {'GB/s':>7} {'of read':>8}"
          f" {'cpu GB/s':>9} {'of read':>8}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['batch']:>5} {r['ctx']:>6}  skipped: {r['skipped']}")
        else:
            print(f"{r['batch']:>5} {r['ctx']:>6} {r['kv_bytes'] / 2**20:>9.1f} {r['ms_best']:>9.3f} "
                  f"{r['floor_ms']:>9.3f} {r['gbps_best']:>7.1f} {r['fraction_of_read']:>7.0%} "
                  f"{r['gbps_cpu_best']:>9.1f} {r['cpu_fraction_of_read']:>7.0%}")
    print(f"host read bandwidth: {read_best:.1f} GB/s ({threads} threads; start {read_start:.1f}, end {read_end:.1f}); "
          f"CPU-time-normalized {read_cpu:.1f} GB/s")
    print("(cpu columns: bytes / (process CPU seconds / threads) -- what the threads achieved while running,"
          " the fair ratio on a machine shared with other work)")
    print(f"handoff (doorbell -> done, {hthreads} serving threads): p50 {handoff['p50_us']:.1f} us, "
          f"p99 {handoff['p99_us']:.1f} us over {handoff['jobs']} jobs")
    t = result["targets"]
    frac = t["kernel_min_fraction_batch16_ctx2048"]
    cfrac = t["kernel_min_cpu_fraction_batch16_ctx2048"]
    print(f"targets: kernel >= 85% of read at batch>=16, ctx>=2048: "
          f"{'n/a' if frac is None else f'{frac:.0%} wall, {cfrac:.0%} cpu-normalized (worst)'}; "
          f"handoff p50 < 20 us: {handoff['p50_us']:.1f} us")
    print(f"load average {load_start[0]:.1f} -> {load_end[0]:.1f} (other work on this machine skews numbers)")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_attention.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(result, samples, os.path.join(args.out, "cpu_attention.png"))
        print(f"wrote {args.out}/cpu_attention.json and .png")
    except ImportError:   # the GPU host's image may lack matplotlib: the JSON has everything
        print(f"wrote {args.out}/cpu_attention.json (no matplotlib here: no PNG)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
