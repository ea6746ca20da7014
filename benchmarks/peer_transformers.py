"""NEO against Hugging Face ``transformers`` generation with static batching: same geometry, same GPU, one run.

The peer is what most people run first: ``LlamaForCausalLM.generate`` on one static batch. For each
batch size B of ``--batches`` both systems get the same B prompts of exactly ``--input-len`` random
token ids and produce exactly ``--output-len`` tokens each, greedily; the figure compared is output
tokens per second of the whole batch (B x output_len / wall time) beside the time to first token.

transformers side (in this process): a ``LlamaConfig`` is derived from the model's geometry
(``neo_common.model_source``: a dummy geometry name, an HF folder or a GGUF; the weights are always
random, the comparison is about speed) and ``LlamaForCausalLM`` is built once for all batch sizes,
directly on ``--device`` in ``--dtype`` (on an H100 an 8B model is allocated and initialized in
under a second; built on the host and moved it would take minutes), with
``attn_implementation="sdpa"`` and the default dynamic KV cache. Per batch size:

- a warm-up ``generate`` of ``--warmup-tokens`` tokens, by default output_len: the very shapes of
  the timed run. PyTorch's SDPA picks cuDNN attention on Hopper, which builds a plan per new
  sequence length; after a short warm-up those builds fell inside the timed run (on an H100 they
  tripled the decode step of an 8B model);
- the time to first token, a separate ``generate`` with ``max_new_tokens=1`` (prefill of the whole
  batch plus one greedy step; every row gets its first token at that moment);
- the timed ``generate`` with ``max_new_tokens = min_new_tokens = output_len`` (``min_new_tokens``
  keeps an end-of-sequence token from stopping a row, like the engine's ``ignore_eos``),
  ``do_sample=False``, ``use_cache=True``.

Times are wall clock between ``torch.cuda.synchronize()`` calls. The model is then deleted and the
CUDA cache emptied before the engine starts (the worker sizes its KV pool from the memory free at
its start, so what this process keeps, its CUDA context, only shrinks the engine's pool a little).

Engine side (the full stack over HTTP): one ``neo serve`` per batch size, with ``--max-num-seqs B``
plus ``--serve-args`` (started and stopped by PID through ``neo_vs_gpu_only.Server``). One server
per B guarantees that the engine runs the same batch as transformers, and a server's startup (dummy
weights, KV pool) takes about ten seconds for an 8B model on an H100, small next to the runs. After
the same warm-up as transformers' (B requests of ``--warmup-tokens`` tokens, other prompts), the B
measured requests are sent at t=0 through the OpenAI client path of ``neo_bench.serve.one_request``
(token-id prompts, ``ignore_eos``, streaming, temperature 0); output tokens/s = tokens received /
wall time from the first send to the last response; TTFT is the p50 over the batch (p99 and the
whole ``summarize`` record in the JSON). The engine's scheduler budgets (``--max-num-batched-tokens``,
the chunked-prefill token budget, default 2048) are its defaults unless passed through
``--serve-args``; transformers prefills the whole batch in one pass.

    python -m neo_bench.peer_transformers --model llama-3-8b --load-format dummy --tokenizer .gpu/tokenizer \\
        --batches 1,8,32,64 --input-len 1000 --output-len 128 --out DIR

Prints a table, writes ``<out>/peer_transformers_<model>.json`` (results, config, hardware with the
GPU name and the torch and transformers versions) and ``.png`` (tok/s and TTFT vs batch size);
exits 1 if a run failed on either side or produced other than the requested number of tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import platform
import shlex
import time

import numpy as np

from neo_bench.neo_vs_gpu_only import Server, hardware, send_all
from neo_bench.serve import summarize
from neo_common.geometry import ModelGeometry
from neo_common.procs import serve_port_flags

log = logging.getLogger(__name__)

PROMPT_ID_LOW, PROMPT_ID_HIGH = 100, 32000  # ordinary tokens in every LLaMA-family vocabulary


# -- shared inputs -----------------------------------------------------------------------------------
def model_geometry(model: str, load_format: str) -> ModelGeometry:
    """The geometry `neo serve` would load for these flags (a dummy name, an HF folder, a GGUF)."""
    from neo_common.config import ModelConfig
    from neo_common.model_source import read_geometry, resolve

    return read_geometry(resolve(ModelConfig(model=model, load_format=load_format)))


def make_prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    """``batch`` prompts of exactly ``input_len`` random token ids."""
    rng = np.random.default_rng(seed)
    return rng.integers(PROMPT_ID_LOW, min(vocab, PROMPT_ID_HIGH), (batch, input_len)).tolist()


# -- transformers ------------------------------------------------------------------------------------
def llama_config(g: ModelGeometry):
    """A ``transformers.LlamaConfig`` of the same shapes (``qkv_bias`` maps to ``attention_bias``,
    which also gives o_proj a bias: no named geometry has either)."""
    from transformers import LlamaConfig

    eos = list(g.eos_token_ids) or None
    return LlamaConfig(
        vocab_size=g.vocab_size, hidden_size=g.hidden_size, intermediate_size=g.intermediate_size,
        num_hidden_layers=g.num_layers, num_attention_heads=g.num_heads, num_key_value_heads=g.num_kv_heads,
        head_dim=g.head_dim, max_position_embeddings=g.max_position_embeddings, rms_norm_eps=g.rms_norm_eps,
        rope_theta=g.rope_theta, rope_scaling=dict(g.rope_scaling) if g.rope_scaling else None,
        tie_word_embeddings=g.tie_word_embeddings, attention_bias=g.qkv_bias,
        bos_token_id=g.bos_token_id, eos_token_id=eos, pad_token_id=eos[0] if eos else 0)


def build_hf_model(g: ModelGeometry, device: str, dtype, seed: int):
    """Random-weight ``LlamaForCausalLM`` allocated and initialized directly on ``device``."""
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(g), attn_implementation="sdpa", **{dtype_kw: dtype})
    model.eval()
    sync(device)
    log.info("transformers %s: %.2fB parameters on %s in %s, built in %.1fs", g.name,
             sum(p.numel() for p in model.parameters()) / 1e9, device, dtype, time.perf_counter() - t0)
    return model


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, input_ids, new_tokens: int, device: str) -> tuple[float, int]:
    """Seconds of one greedy ``generate`` of exactly ``new_tokens`` tokens, and the tokens it made per row."""
    import torch

    mask = torch.ones_like(input_ids)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=model.config.pad_token_id)
    sync(device)
    return time.perf_counter() - t0, int(out.shape[1] - input_ids.shape[1])


def hf_batch(model, prompts: list[list[int]], output_len: int, warmup_tokens: int, device: str) -> dict:
    """Warm-up, time to first token and the timed generate of one static batch."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    batch = len(prompts)
    if warmup_tokens:
        timed_generate(model, ids, warmup_tokens, device)
    ttft, _ = timed_generate(model, ids, 1, device)
    seconds, made = timed_generate(model, ids, output_len, device)
    out = {"time_s": seconds, "ttft_s": ttft, "output_tokens": batch * made,
           "output_tok_s": batch * made / seconds, "error": None}
    if made != output_len:
        out["error"] = f"generated {made} tokens per row, not {output_len}"
    return out


def run_hf(args: argparse.Namespace, g: ModelGeometry) -> dict[int, dict]:
    """Every batch size on one transformers model, freed (with the CUDA cache) before returning."""
    import torch

    try:
        model = build_hf_model(g, args.device, getattr(torch, args.dtype), args.seed)
    except Exception as exc:  # e.g. the weights do not fit: the engine part still runs
        log.error("transformers model build failed: %s", exc)
        free_cuda(args.device)
        return {b: {"output_tok_s": None, "ttft_s": None, "error": f"{type(exc).__name__}: {exc}"}
                for b in args.batches}
    results: dict[int, dict] = {}
    try:
        for batch in args.batches:
            log.info("transformers: batch %d, %d+%d tokens", batch, args.input_len, args.output_len)
            try:
                prompts = make_prompts(batch, args.input_len, g.vocab_size, args.seed + batch)
                results[batch] = hf_batch(model, prompts, args.output_len, args.warmup_tokens, args.device)
            except Exception as exc:  # e.g. out of memory at a large batch: keep the other points
                log.error("transformers batch %d failed: %s", batch, exc)
                results[batch] = {"output_tok_s": None, "ttft_s": None, "error": f"{type(exc).__name__}: {exc}"}
                free_cuda(args.device)
    finally:
        del model
        free_cuda(args.device)
    return results


def free_cuda(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -- engine ------------------------------------------------------------------------------------------
def serve_argv(args: argparse.Namespace, batch: int) -> list[str]:
    """`neo serve` flags for one batch size, with its own free ports."""
    flags = {"--model": args.model, "--load-format": args.load_format, "--tokenizer": args.tokenizer,
             "--device": args.device, "--dtype": args.dtype, "--max-num-seqs": batch}
    out = [x for k, v in flags.items() if v for x in (k, str(v))]
    extra = shlex.split(args.serve_args)
    return out + serve_port_flags(1, extra) + extra   # not the fixed defaults: no clash with others


def engine_batch(args: argparse.Namespace, batch: int, vocab: int) -> dict:
    """Start `neo serve` for one batch size, warm it up, send the batch at t=0, stop it."""
    argv = serve_argv(args, batch)
    server = Server(argv, os.path.join(args.out, f"serve_peer_b{batch}.log"))
    out: dict = {"serve_args": argv, "output_tok_s": None, "ttft_s": None, "error": None}
    try:
        t = time.monotonic()
        server.wait_ready(args.ready_timeout)
        out["startup_s"] = time.monotonic() - t
        model = server.served_model()
        zeros = np.zeros(batch)
        if args.warmup_tokens:
            warm = make_prompts(batch, args.input_len, vocab, args.seed + 10_000 + batch)
            asyncio.run(send_all(server.url, model, warm, [args.warmup_tokens] * batch, zeros))
        prompts = make_prompts(batch, args.input_len, vocab, args.seed + batch)
        log.info("engine: batch %d, %d+%d tokens", batch, args.input_len, args.output_len)
        results, wall = asyncio.run(send_all(server.url, model, prompts, [args.output_len] * batch, zeros))
        out.update(engine_figures(results, wall, batch, args.output_len))
    except Exception as exc:  # one batch size failing must not lose the others' results
        log.error("engine batch %d failed: %s", batch, exc)
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        server.stop(args.stop_grace)
    return out


def engine_figures(results: list[dict], wall: float, batch: int, output_len: int) -> dict:
    """Throughput and TTFT of one batch from the `one_request` results; an error if tokens are missing."""
    summary = summarize(results, wall, {})
    tokens = sum(r["tokens"] for r in results if r["error"] is None)
    ttft = summary["ttft_s"]
    out = {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
           "ttft_s": ttft.get("p50"), "ttft_p99_s": ttft.get("p99"), "summary": summary, "error": None}
    if summary["failed"] or tokens != batch * output_len:
        out["error"] = (f"{summary['failed']} of {batch} requests failed, {tokens} of {batch * output_len} "
                        f"tokens; {summary['errors']}")
    return out


def run_engine(args: argparse.Namespace, g: ModelGeometry) -> dict[int, dict]:
    return {batch: engine_batch(args, batch, g.vocab_size) for batch in args.batches}


# -- report ------------------------------------------------------------------------------------------
def versions(device: str) -> dict:
    import torch

    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:  # --skip-hf needs no transformers
        hf_version = None
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"torch": torch.__version__, "transformers": hf_version, "python": platform.python_version(),
            "torch_device": device, "torch_device_name": gpu, "cuda": torch.version.cuda}


def rows(hf: dict[int, dict], neo: dict[int, dict], batches: list[int]) -> list[dict]:
    out = []
    for b in batches:
        h, n = hf.get(b) or {}, neo.get(b) or {}
        ht, nt = h.get("output_tok_s"), n.get("output_tok_s")
        out.append({"batch": b, "hf_tok_s": ht, "neo_tok_s": nt, "ratio": nt / ht if ht and nt is not None else None,
                    "hf_ttft_s": h.get("ttft_s"), "neo_ttft_s": n.get("ttft_s"), "hf": h or None, "neo": n or None})
    return out


def _f(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x * scale, spec)


def table(report: dict) -> str:
    lines = [f"{'batch':>5} {'HF tok/s':>10} {'NEO tok/s':>10} {'NEO/HF':>7} {'HF TTFT ms':>11} {'NEO TTFT ms':>12}"]
    for r in report["rows"]:
        lines.append(f"{r['batch']:>5} {_f(r['hf_tok_s'], '.1f'):>10} {_f(r['neo_tok_s'], '.1f'):>10} "
                     f"{_f(r['ratio'], '.2f'):>7} {_f(r['hf_ttft_s'], '.1f', 1e3):>11} "
                     f"{_f(r['neo_ttft_s'], '.1f', 1e3):>12}")
    c, hw = report["config"], report["hardware"]
    lines.append(f"{c['model']} ({report['geometry']['name']}), {c['input_len']} in + {c['output_len']} out tokens, "
                 f"{c['dtype']} on {hw['torch_device_name'] or c['device']} | torch {hw['torch']} | "
                 f"transformers {hw['transformers']}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("hf", "transformers generate"), ("neo", "NEO (neo serve)")):
        pts = [(r["batch"], r[f"{key}_tok_s"], r[f"{key}_ttft_s"]) for r in report["rows"]]
        axes[0].plot([b for b, t, _ in pts if t], [t for _, t, _ in pts if t], "o-", label=label)
        axes[1].plot([b for b, _, s in pts if s], [s for _, _, s in pts if s], "o-", label=label)
    axes[0].set_ylabel("output tokens/s (whole batch)")
    axes[1].set_ylabel("TTFT (s; NEO p50)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.legend()
    c = report["config"]
    fig.suptitle(f"{c['model']}: NEO vs transformers, {c['input_len']}+{c['output_len']} tokens, "
                 f"{report['hardware']['torch_device_name'] or c['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m neo_bench.peer_transformers", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b", help="as for `neo serve` (a dummy geometry name, ...)")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--tokenizer", default=None, help="passed to `neo serve`")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (both systems)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="both systems (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--batches", default="1,8,32,64", help="comma list of batch sizes")
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="output tokens of the warm-up batch of each batch size (default: --output-len; 0: none)")
    ap.add_argument("--serve-args", default="", help="extra `neo serve` flags, one string (shlex-split)")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--stop-grace", type=float, default=60.0)
    ap.add_argument("--skip-hf", action="store_true", help="engine only")
    ap.add_argument("--skip-engine", action="store_true", help="transformers only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if not args.batches or min(args.batches) < 1 or args.input_len < 1 or args.output_len < 1:
        ap.error("--batches, --input-len and --output-len must be positive")
    args.warmup_tokens = args.output_len if args.warmup_tokens is None else args.warmup_tokens
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    g = model_geometry(args.model, args.load_format)
    hw = {**hardware(None), **versions(args.device)}
    hf = {} if args.skip_hf else run_hf(args, g)
    neo = {} if args.skip_engine else run_engine(args, g)
    report = {"config": vars(args), "geometry": g.to_dict(), "hardware": hw, "rows": rows(hf, neo, args.batches)}
    name = os.path.basename(os.path.normpath(args.model)).removesuffix(".gguf")
    stem = os.path.join(args.out, f"peer_transformers_{name}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    plot(report, stem + ".png")
    print(table(report))
    return 1 if any(r["error"] for r in [*hf.values(), *neo.values()]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
