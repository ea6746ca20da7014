"""Decode and prefill of the GPU worker's model runner against the roofline of the same GPU.

In one run: measure HBM bandwidth (a large device copy, bytes read + written) and the bf16 matmul
rate, then time decode iterations of a dummy-weight geometry at several batch sizes and contexts
(the floor is max(bytes of weights + KV read / bandwidth, FLOPs / matmul rate); the weights read
are every matrix but the input embedding table, of which a decode reads only its rows) and
single-prompt prefill (FLOPs over the measured matmul rate), for each variant of the GPU path side by side:
``graphs`` (Triton kernels + CUDA graphs, the default), ``eager`` (Triton kernels launched from
Python: ``--enforce-eager``) and ``torch`` (the portable torch twins: ``--kernels torch``). A decode
point is timed two ways: ``steady`` (back-to-back iterations, each launched before the previous
one's tokens are awaited, as the worker serves them: the iteration time a served batch sees) and
``single`` (one iteration alone, host preparation and the tokens' copy back included). With
``--kernel-batches``, the CUDA kernels of the graphs variant's decode at those batches are listed
(torch.profiler), to show where an iteration's time goes. Prints a table, writes JSON and a PNG.

    python benchmarks/roofline.py --geometry llama-3-8b --out docs/benchmarks/roofline
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np
import torch

from neo_common.geometry import lookup
from neo_common.protocol import IterationPlan
from neo_gpu_worker import ops
from neo_gpu_worker.loader import build_model
from neo_gpu_worker.model_runner import ModelRunner

BLOCK = 16


def timed(fn, reps: int) -> float:
    """Median seconds of fn() with CUDA events (warm-up first)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def steady(runner: ModelRunner, plan: IterationPlan, reps: int) -> float:
    """Seconds per iteration of ``reps`` back-to-back iterations, each launched before the previous
    one's tokens are awaited (the worker's serving loop)."""
    runner.execute(plan)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launched = runner.launch(plan)
    for _ in range(reps - 1):
        behind = runner.launch(plan)
        launched.finish()
        launched = behind
    launched.finish()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def kernels(runner: ModelRunner, plan: IterationPlan, reps: int = 5) -> dict:
    """The CUDA kernels of one decode iteration (mean of ``reps``): time per kernel name, and their
    sum against the iteration's steady time (the rest: gaps between kernels)."""
    from torch.profiler import ProfilerActivity, profile

    t = steady(runner, plan, reps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            runner.execute(plan)
    per_name = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if us > 0 and e.count >= reps:
            per_name[e.key] = (us / reps / 1e3, e.count / reps)
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    busy = sum(ms for ms, _ in per_name.values())
    return {"steady_ms": t * 1e3, "kernel_ms": busy,
            "kernels": [{"name": k[:90], "ms": ms, "per_iteration": n} for k, (ms, n) in top[:15]]}


def decode_weight_bytes(g, batch: int) -> int:
    """Bytes of weights a decode step reads: all but the input embedding table (its ``batch`` rows
    only); with tied embeddings the table is read whole as the LM head."""
    table = 0 if g.tie_word_embeddings else g.vocab_size * g.hidden_size
    return (g.num_parameters() - table + batch * g.hidden_size) * 2


def hbm_bandwidth() -> float:
    src = torch.randn(512 * 1024 * 1024, device="cuda", dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * src.element_size() / t


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ b, 20)
    return 2 * 8192**3 / t


def decode_plan(batch: int, ctx: int, tables: np.ndarray) -> IterationPlan:
    return IterationPlan(
        iteration_id=1, seq_ids=np.arange(batch, dtype=np.int64), places=np.zeros(batch, np.uint8),
        sub_batch=np.zeros(batch, np.uint8), start_pos=np.full(batch, ctx, np.int32),
        num_tokens=np.ones(batch, np.int32), token_ids=np.full(batch, 7, np.int32), block_tables=tables,
        sample=np.ones(batch, np.uint8), temperature=np.zeros(batch, np.float32), top_p=np.ones(batch, np.float32),
        top_k=np.full(batch, -1, np.int32), seeds=np.full(batch, -1, np.int64), steps=np.zeros(batch, np.int32))


def prefill_plan(length: int) -> IterationPlan:
    plan = decode_plan(1, 0, np.arange(-(-length // BLOCK), dtype=np.int32)[None, :])
    plan.num_tokens = np.array([length], np.int32)
    plan.token_ids = np.full(length, 7, np.int32)
    return plan


def measure(runner: ModelRunner, g, blocks: int, bw: float, flops: float, args: argparse.Namespace) -> list[dict]:
    kv_token = g.kv_bytes_per_token(2)
    rows = []
    for ctx in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            need = -(-(ctx + 1) // BLOCK)
            if batch * need > blocks:
                rows.append({"kind": "decode", "batch": batch, "ctx": ctx, "skipped": "KV does not fit"})
                continue
            tables = np.arange(batch * need, dtype=np.int32).reshape(batch, need)
            plan = decode_plan(batch, ctx, tables)
            t = steady(runner, plan, 2 * args.reps)
            single = timed(lambda: runner.execute(plan), args.reps)
            byte_floor = (decode_weight_bytes(g, batch) + batch * (ctx + 1) * kv_token) / bw
            flop_floor = 2 * g.num_parameters() * batch / flops
            floor = max(byte_floor, flop_floor)
            rows.append({"kind": "decode", "batch": batch, "ctx": ctx, "time_s": t, "single_s": single,
                         "floor_s": floor, "byte_floor_s": byte_floor, "flop_floor_s": flop_floor,
                         "ratio": t / floor})
            if runner.graphs is not None and batch in args.kernel_batches:
                rows[-1]["kernels"] = kernels(runner, plan)
    for length in map(int, args.prefills.split(",")):
        if -(-length // BLOCK) > blocks or length > g.max_position_embeddings:
            continue  # beyond the pool or the model's context
        plan = prefill_plan(length)
        t = timed(lambda: runner.execute(plan), max(3, args.reps // 3))
        attn = 2 * 2 * g.num_layers * g.num_heads * g.head_dim * length * length / 2  # causal QK^T and PV
        work = 2 * g.num_parameters() * length + attn
        rows.append({"kind": "prefill", "tokens": length, "time_s": t, "flop_floor_s": work / flops,
                     "matmul_fraction": work / t / flops})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="llama-3-8b")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--prefills", default="512,1024,2048,4096,8192")
    ap.add_argument("--kv-gb", type=float, default=40.0, help="KV pool size; points that do not fit are skipped")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default="graphs,eager,torch", help="GPU paths to time (see the docstring)")
    ap.add_argument("--kernel-batches", default="", help="list the CUDA kernels of the graphs variant's decode "
                                                         "at these batch sizes (e.g. 1,256)")
    ap.add_argument("--out", default="roofline-out")
    args = ap.parse_args()
    args.kernel_batches = {int(b) for b in args.kernel_batches.split(",") if b}
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    bw, flops = hbm_bandwidth(), matmul_rate()
    g = lookup(args.geometry)
    dtype, device = torch.bfloat16, torch.device("cuda", 0)
    model = build_model(g, g.max_position_embeddings, device, dtype)
    model.init_random(0)
    per_block = g.kv_bytes_per_block(BLOCK, 2)
    blocks = int(args.kv_gb * 1024**3 // per_block)
    rows = []
    for variant in args.variants.split(","):
        ops.configure("torch" if variant == "torch" else "auto", device)
        graph_batch = max(map(int, args.batches.split(","))) if variant == "graphs" else 0
        runner = ModelRunner(model, blocks, BLOCK, device, dtype, graph_max_batch=graph_batch,
                             max_model_len=g.max_position_embeddings)
        rows += [dict(r, variant=variant) for r in measure(runner, g, blocks, bw, flops, args)]
        del runner
        torch.cuda.empty_cache()
    result = {"geometry": g.name, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "hbm_bytes_per_s": bw, "matmul_flop_per_s": flops, "rows": rows}
    with open(os.path.join(args.out, f"roofline_{g.name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{g.name} on {result['gpu']}: HBM {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    print(f"{'variant':8} {'kind':8} {'batch/tok':>9} {'ctx':>6} {'time ms':>9} {'single':>9} {'floor ms':>9} "
          f"{'x floor':>8}")
    for r in rows:
        head = f"{r['variant']:8} {r['kind']:8}"
        if r.get("skipped"):
            print(f"{head} {r['batch']:>9} {r['ctx']:>6} {'skipped: ' + r['skipped']:>38}")
        elif r["kind"] == "decode":
            print(f"{head} {r['batch']:>9} {r['ctx']:>6} {r['time_s'] * 1e3:>9.2f} {r['single_s'] * 1e3:>9.2f} "
                  f"{r['floor_s'] * 1e3:>9.2f} {r['ratio']:>8.2f}")
        else:
            print(f"{head} {r['tokens']:>9} {'':>6} {r['time_s'] * 1e3:>9.2f} {'':>9} {r['flop_floor_s'] * 1e3:>9.2f} "
                  f"{1 / r['matmul_fraction']:>8.2f}")
    for r in rows:
        if "kernels" in r:
            k = r["kernels"]
            print(f"\nkernels of a batch-{r['batch']} ctx-{r['ctx']} decode: {k['kernel_ms']:.2f} ms of "
                  f"{k['steady_ms']:.2f} ms busy (floor {r['floor_s'] * 1e3:.2f} ms)")
            for e in k["kernels"]:
                print(f"  {e['ms']:7.3f} ms  x{e['per_iteration']:<5.0f} {e['name']}")
    plot(result, os.path.join(args.out, f"roofline_{g.name}.png"))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    decode = [r for r in result["rows"] if r["kind"] == "decode" and not r.get("skipped")]
    variants = list(dict.fromkeys(r["variant"] for r in decode))
    for ctx in sorted({r["ctx"] for r in decode}):
        for variant in variants:
            pts = [r for r in decode if r["ctx"] == ctx and r["variant"] == variant]
            ax.plot([r["batch"] for r in pts], [r["time_s"] * 1e3 for r in pts], "o-", label=f"{variant}, ctx {ctx}")
        pts = [r for r in decode if r["ctx"] == ctx and r["variant"] == variants[0]]
        ax.plot([r["batch"] for r in pts], [r["floor_s"] * 1e3 for r in pts], "k--", label=f"floor, ctx {ctx}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch")
    ax.set_ylabel("iteration time (ms)")
    ax.set_title(f"{result['geometry']} decode on {result['gpu']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
