"""What the structured-output bitmask costs per iteration.

Device side (the worker): ``SamplingBatch.from_columns`` + ``sample`` for a batch of ``--batch``
rows over a ``--vocab`` vocabulary (Llama-3's 128256 by default), without masks and with a grammar
mask on every row, timed with CUDA events (host clock on the CPU) over ``--reps`` iterations after
a warm-up; half the rows greedy, half sampled with temperature and top-p, as a mixed load.

Host side (the gateway, with ``--host``): ``fill_bitmasks`` for ``--batch`` JSON-schema matchers
mid-object on the embedded model's tokenizer (needs the package and llguidance installed; or a
Hugging Face tokenizer folder, ``--tokenizer DIR``), the work the gateway does per iteration while
the GPU runs the previous one.

Prints one JSON object. Usage: ``python -m neo_bench.structured_overhead --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _packed(allowed: np.ndarray) -> np.ndarray:
    words = (allowed.shape[1] + 31) // 32
    padded = np.zeros((allowed.shape[0], words * 32), bool)
    padded[:, :allowed.shape[1]] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


def device_cost(batch: int, vocab: int, device: torch.device, reps: int) -> dict:
    from neo_gpu_worker.sampler import SamplingBatch, sample

    rng = np.random.default_rng(0)
    logits = torch.randn(batch, vocab, device=device)
    temps = np.where(np.arange(batch) % 2 == 0, 0.0, 0.8).astype(np.float32)
    top_p = np.where(np.arange(batch) % 2 == 0, 1.0, 0.95).astype(np.float32)
    masks = _packed(rng.random((batch, vocab)) < 0.02)   # a JSON state allows a few percent of tokens
    rows = np.arange(batch)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(with_mask: bool) -> None:
        params = SamplingBatch.from_columns(temps, top_p, np.full(batch, -1, np.int32), np.full(batch, -1, np.int64),
                                            np.zeros(batch, np.int32), vocab, device,
                                            bitmask=(rows, masks, rows) if with_mask else None)
        sample(logits, params, gen)

    out = {}
    for name, with_mask in (("plain", False), ("masked", True), ("plain_again", False)):
        for _ in range(10):
            step(with_mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                step(with_mask)
            end.record()
            end.synchronize()
            out[f"{name}_ms"] = start.elapsed_time(end) / reps
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                step(with_mask)
            out[f"{name}_ms"] = (time.perf_counter() - t0) * 1e3 / reps
    plain = (out["plain_ms"] + out["plain_again_ms"]) / 2
    out["mask_overhead_ms"] = out["masked_ms"] - plain
    return out


def host_cost(batch: int, reps: int, tokenizer: str | None = None) -> dict:
    from neo_common.model_source import embedded_gguf_path
    from neo_gateway.structured_output import StructuredOutputManager, fill_bitmasks, spec_from_fields
    from neo_gateway.tokenizer import TextTokenizer

    tok = TextTokenizer.from_hf_folder(tokenizer) if tokenizer else TextTokenizer.from_gguf(embedded_gguf_path())
    manager = StructuredOutputManager(tok, tok.vocab_size)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}, "tags": {"type": "array",
                                                                                    "items": {"type": "string"}}},
              "required": ["name", "age", "tags"]}
    requests = [manager.request_for(spec_from_fields({"guided_json": schema})) for _ in range(batch)]
    for r in requests:   # mid-object: inside the name string, as most steps of a JSON answer are
        for t in tok.encode('{"name":"Al', add_special_tokens=False):
            assert r.accept(t)
    fill_bitmasks(requests)
    t0 = time.perf_counter()
    for _ in range(reps):
        fill_bitmasks(requests)
    per_iteration = (time.perf_counter() - t0) * 1e3 / reps
    manager.close()
    return {"fill_ms_per_iteration": per_iteration, "fill_ms_per_row": per_iteration / batch,
            "vocab": tok.vocab_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--host", action="store_true", help="also time the gateway's mask fill")
    ap.add_argument("--tokenizer", default=None, help="--host's tokenizer folder (default: the embedded model's)")
    args = ap.parse_args()
    device = torch.device(args.device)
    report = {"batch": args.batch, "vocab": args.vocab, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "sampler": device_cost(args.batch, args.vocab, device, args.reps)}
    if args.host:
        report["gateway"] = host_cost(args.batch, max(10, args.reps // 10), args.tokenizer)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
