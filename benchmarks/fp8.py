"""FP8 dense layers against bf16 on one GPU: agreement and iteration time.

For each model (a dummy-weight geometry such as llama-3-8b, and a random tiny Llama whose weights
are large enough for its logits to be far from uniform) the same random weights are loaded twice: as
bf16, and with ``--quantization fp8`` (per-output-channel e4m3 weights, ``torch._scaled_mm`` with
per-token activation scales). Both run through the worker's ``ModelRunner`` with CUDA graphs, as
served. Three FP8 variants: ``fp8`` as the worker runs it (batches of at most
``fp8.W8A16_ROWS`` rows through the weight-only Triton kernel, larger ones through ``_scaled_mm``),
``fp8-mm`` (``_scaled_mm`` at every size) and ``fp8-w8a16`` (the weight-only kernel up to 128 rows).

- agreement: greedy tokens of 8 prompts over ``--new-tokens`` steps (fraction of positions equal,
  and where the first difference falls), and the logits of a 128-token prefill (relative L2 error,
  largest absolute difference, top-1 agreement over the positions);
- time: decode iterations at batch 1/32/128 over ``--ctx`` tokens of context (steady back-to-back
  iterations, as ``roofline.steady`` times them) and one 4096-token prefill (``roofline.timed``),
  the variants interleaved A B C D D C B A for ``--repeats`` rounds after a warm-up, so drift in clocks or
  temperature hits both alike; the median and the min..max spread over the rounds are reported.

Prints a table, writes ``fp8.json`` and ``fp8.png`` under ``--out``.

    python benchmarks/fp8.py --out docs/benchmarks/fp8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

import numpy as np
import torch

from neo_bench.roofline import BLOCK, decode_plan, prefill_plan, steady, timed
from neo_common.geometry import ModelGeometry, lookup
from neo_gpu_worker import fp8, ops
from neo_gpu_worker.batch import build_sub_batch
from neo_gpu_worker.loader import build_model
from neo_gpu_worker.model_runner import ModelRunner

DEVICE = torch.device("cuda", 0)
TINY = dataclasses.replace(lookup("llama-3-8b"), name="tiny-random-llama", hidden_size=256, num_layers=4,
                           num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=768, vocab_size=4096)


def load(g: ModelGeometry, quantization: str, weight_gain: float) -> torch.nn.Module:
    """``g``'s model with the seed-0 dummy weights times ``weight_gain`` (norms left at 1)."""
    model = build_model(dataclasses.replace(g, quantization=quantization), g.max_position_embeddings, DEVICE,
                        torch.bfloat16)
    model.load_weights((n, t if n.endswith("norm.weight") else t * weight_gain) for n, t in model._random_tensors(0))
    torch.cuda.empty_cache()
    return model


def greedy(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy continuations (one prefill iteration, then batched decodes)."""
    need = -(-(max(map(len, prompts)) + steps) // BLOCK)
    tables = np.arange(len(prompts) * need, dtype=np.int32).reshape(len(prompts), need)
    out = []
    for i, p in enumerate(prompts):
        plan = decode_plan(1, 0, tables[i:i + 1])
        plan.seq_ids[:] = i
        plan.num_tokens, plan.token_ids = np.array([len(p)], np.int32), np.array(p, np.int32)
        out.append([int(runner.execute(plan).token_ids[0])])
    for _ in range(steps - 1):
        plan = decode_plan(len(prompts), 0, tables)
        plan.start_pos = np.array([len(p) + len(o) - 1 for p, o in zip(prompts, out)], np.int32)
        plan.token_ids = np.array([o[-1] for o in out], np.int32)
        for o, t in zip(out, runner.execute(plan).token_ids.tolist()):
            o.append(int(t))
    return out


def prefill_logits(runner: ModelRunner, tokens: list[int]) -> torch.Tensor:
    plan = prefill_plan(len(tokens))
    plan.token_ids = np.array(tokens, np.int32)
    sb = build_sub_batch(plan, np.arange(1), BLOCK, DEVICE, 0)
    with torch.inference_mode():
        return runner.model.compute_logits(runner.model(sb.input_ids, sb.positions, runner.kv_cache, sb.meta))


def agreement(runners: dict, variant: str, vocab: int, steps: int) -> dict:
    """``variant`` against bf16: greedy tokens of 8 prompts, and the logits of a prefill (of 128
    tokens, the decode path's sizes, and of 512, past ``W8A16_ROWS``)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, size=int(n)).tolist() for n in rng.integers(16, 64, 8)]
    a, b = (greedy(runners[k], prompts, steps) for k in ("bf16", variant))
    same = [sum(x == y for x, y in zip(ra, rb)) / steps for ra, rb in zip(a, b)]
    first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), steps) for ra, rb in zip(a, b)]
    out = {"greedy_equal_fraction": float(np.mean(same)), "first_difference_median": float(np.median(first)),
           "steps": steps}
    for length in (128, 512):
        tokens = rng.integers(3, vocab, size=length).tolist()
        la, lb = (prefill_logits(runners[k], tokens) for k in ("bf16", variant))
        out[f"prefill_{length}"] = {
            "logits_rel_l2": float((lb - la).norm() / la.norm()),
            "logits_max_abs_diff": float((lb - la).abs().max()), "logits_max_abs": float(la.abs().max()),
            "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).float().mean())}
    return out


def abba(fns: dict, repeats: int) -> dict:
    """Each of the two callables timed in A B B A order, ``repeats`` rounds (one untimed round first)."""
    times = {k: [] for k in fns}
    order = list(fns)
    for k in order:
        fns[k]()
    for _ in range(repeats):
        for k in order + order[::-1]:
            times[k].append(fns[k]())
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "all_s": v}
            for k, v in times.items()}


def timings(runners: dict, g: ModelGeometry, args: argparse.Namespace) -> list[dict]:
    rows = []
    for batch in map(int, args.batches.split(",")):
        need = -(-(args.ctx + 1) // BLOCK)
        plan = decode_plan(batch, args.ctx, np.arange(batch * need, dtype=np.int32).reshape(batch, need))
        t = abba({k: (lambda r=r: steady(r, plan, args.reps)) for k, r in runners.items()}, args.repeats)
        rows.append({"kind": "decode", "batch": batch, "ctx": args.ctx, **t})
    for length in map(int, args.prefills.split(",")):
        plan = prefill_plan(length)
        t = abba({k: (lambda r=r: timed(lambda: r.execute(plan), 3)) for k, r in runners.items()}, args.repeats)
        rows.append({"kind": "prefill", "tokens": length, **t})
    for r in rows:
        r["speedup"] = {k: r["bf16"]["median_s"] / r[k]["median_s"] for k in runners if k != "bf16"}
    return rows


def run_model(g: ModelGeometry, gain: float, args: argparse.Namespace) -> dict:
    max_batch = max(map(int, args.batches.split(",")))
    longest = max([args.ctx + 1] + [int(p) for p in args.prefills.split(",")])
    blocks = max(max_batch * -(-(args.ctx + args.new_tokens + 64) // BLOCK), -(-longest // BLOCK)) + 8
    runners, weights = {}, {}
    for name, rows in (("bf16", None), ("fp8", fp8.W8A16_ROWS), ("fp8-mm", 0), ("fp8-w8a16", 128)):
        model = load(g, "none" if rows is None else "fp8", gain)
        for m in model.modules():   # before the graphs are captured: they keep the path taken then
            if isinstance(m, fp8.Fp8Linear):
                m.w8a16_rows = rows
        weights[name] = sum(p.numel() * p.element_size() for p in model.parameters())
        runners[name] = ModelRunner(model, blocks, BLOCK, DEVICE, torch.bfloat16, graph_max_batch=max_batch,
                                    max_model_len=g.max_position_embeddings)
    result = {"model": g.name, "weight_gain": gain, "weight_bytes": weights,
              "agreement": {k: agreement(runners, k, g.vocab_size, args.new_tokens) for k in runners if k != "bf16"},
              "rows": timings(runners, g, args)}
    del runners
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="llama-3-8b")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--ctx", type=int, default=512, help="context tokens of each decode row")
    ap.add_argument("--prefills", default="4096")
    ap.add_argument("--reps", type=int, default=20, help="iterations per decode measurement")
    ap.add_argument("--repeats", type=int, default=3, help="ABBA rounds")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="fp8-out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ops.configure("auto", DEVICE)
    # dummy weights N(0, 0.02) as the roofline uses them; the tiny model's 4x larger (logits far from uniform)
    models = [run_model(lookup(args.geometry), 1.0, args), run_model(TINY, 4.0, args)]
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(args), "models": models}
    with open(os.path.join(args.out, "fp8.json"), "w") as f:
        json.dump(result, f, indent=2)
    report(result)
    plot(result, os.path.join(args.out, "fp8.png"))


def report(result: dict) -> None:
    """The table: per model, the agreement of each FP8 variant and the timings side by side."""
    print(f"FP8 vs bf16 on {result['gpu']} (torch {result['torch']}); medians of {result['args']['repeats']} "
          "ABBA rounds, [min..max]")
    cell = lambda t: f"{t['median_s'] * 1e3:.3f} [{t['min_s'] * 1e3:.3f}..{t['max_s'] * 1e3:.3f}]"  # noqa: E731
    for m in result["models"]:
        w = m["weight_bytes"]
        print(f"\n{m['model']}: weights {w['bf16'] / 2**30:.2f} GiB (bf16) -> {w['fp8'] / 2**30:.2f} GiB (fp8)")
        for variant, a in m["agreement"].items():
            p128, p512 = a["prefill_128"], a["prefill_512"]
            print(f"  {variant} vs bf16: greedy tokens equal {a['greedy_equal_fraction']:.1%} over {a['steps']} steps "
                  f"(first difference at step {a['first_difference_median']:.0f}, median); prefill logits rel. L2 "
                  f"{p128['logits_rel_l2']:.4f} (128 tokens) / {p512['logits_rel_l2']:.4f} (512), top-1 agreement "
                  f"{p128['top1_agreement']:.1%} / {p512['top1_agreement']:.1%}")
        variants = list(m["rows"][0]["speedup"])
        print(f"  {'kind':8} {'size':>6} {'bf16 ms':>24}" + "".join(f" {k + ' ms':>24} {'x':>6}" for k in variants))
        for r in m["rows"]:
            size = r.get("batch", r.get("tokens"))
            print(f"  {r['kind']:8} {size:>6} {cell(r['bf16']):>24}"
                  + "".join(f" {cell(r[k]):>24} {r['speedup'][k]:>5.2f}x" for k in variants))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["models"]), figsize=(6 * len(result["models"]), 4))
    for ax, m in zip(np.atleast_1d(axes), result["models"]):
        labels = [f"decode b{r['batch']}" if r["kind"] == "decode" else f"prefill {r['tokens']}" for r in m["rows"]]
        x = np.arange(len(labels))
        keys = ["bf16"] + list(m["rows"][0]["speedup"])
        for j, key in enumerate(keys):
            med = [r[key]["median_s"] * 1e3 for r in m["rows"]]
            err = [[r[key]["median_s"] * 1e3 - r[key]["min_s"] * 1e3 for r in m["rows"]],
                   [r[key]["max_s"] * 1e3 - r[key]["median_s"] * 1e3 for r in m["rows"]]]
            ax.bar(x + (j - 1.5) * 0.2, med, 0.2, yerr=err, label=key)
        for i, r in enumerate(m["rows"]):
            ax.text(i, r["bf16"]["median_s"] * 1e3 * 1.2, f"fp8 {r['speedup']['fp8']:.2f}x", ha="center", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("iteration time (ms)")
        ax.set_title(f"{m['model']} on {result['gpu']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
