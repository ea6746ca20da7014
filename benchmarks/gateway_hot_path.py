"""The gateway's per-token hot path before and after: incremental detokenization and JSON encoding.

- **detokenize**: ``IncrementalDetokenizer.add`` per token over realistic output (English prose,
  code, multi-byte text; one stop string, so the stop check runs as in a real request), with the
  window decoder (two ``TextTokenizer.decode`` calls of the token window from Python: the path
  before) against ``tokenizers``' ``DecodeStream`` (one call into Rust: the path now). The figure
  is microseconds per token.
- **sse_chunk**: one streamed chat chunk as bytes on the wire: ``json.dumps`` and the UTF-8 encode
  Starlette does to a ``str`` chunk (before) against ``fast_json.sse_event`` (orjson, now), for a
  content-only chunk and for one with ``top_logprobs=5``. Microseconds per chunk.
- **response**: a whole 256-token chat response with logprobs rendered by Starlette's
  ``JSONResponse`` against ``FastJSONResponse``. Microseconds per response.

Every pair runs interleaved in ABBA order over ``--reps`` repetitions after a warm-up
(``neo_bench.comparison``); each figure is min / median / max over the repetitions and each ratio
(before over after: the speed-up) median over median with its extremes' range, "no difference"
where the ranges overlap; and the ratio within each repetition (its two runs back to back), whose
min / median / max is the steadier figure on a loaded machine. Only the ratios mean something there.

    python -m neo_bench.gateway_hot_path --reps 5 --out docs/benchmarks/gateway_hot_path

Prints a table; writes ``<out>/gateway_hot_path.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Callable

from neo_bench.comparison import Spread, abba_order, describe, verdict

TEXT = (
    "The capital of France is Paris. It lies on the Seine, and its museums hold some of the best-known "
    "paintings in the world. Visitors often start at the Louvre, walk along the river to Notre-Dame, "
    "and end the day in Montmartre.\n\n"
    "```python\ndef fibonacci(n: int) -> list[int]:\n    out = [0, 1]\n    while len(out) < n:\n"
    "        out.append(out[-1] + out[-2])\n    return out[:n]\n```\n\n"
    "Naïve café owners in Zürich say “grüezi”; 日本語のテキストも混ざります。한국어 문장도 있습니다. "
    "Emoji 🤖🚀 and symbols ∑ ≤ € — all split across byte tokens. "
    "1. First item\n2. Second item, with numbers 12345 and 3.14159\n3. Third: {\"key\": [1, 2, 3]}\n"
)
STOP = ["\n\n\n\n"]   # never met: the stop check runs every token, as in a request with a stop string


def _timer(fn: Callable[[], int]) -> float:
    """Seconds per item of one call of ``fn`` (which returns how many items it did)."""
    t0 = time.perf_counter()
    items = fn()
    return (time.perf_counter() - t0) / items


def detokenize_cases(tokens: int):
    from neo_common.model_source import embedded_gguf_path
    from neo_gateway.detokenizer import IncrementalDetokenizer, WindowDecoder
    from neo_gateway.tokenizer import TextTokenizer

    tok = TextTokenizer.from_gguf(embedded_gguf_path())
    base = tok.encode(TEXT, add_special_tokens=False)
    ids = (base * (tokens // len(base) + 1))[:tokens]

    def run(window: bool) -> Callable[[], int]:
        def go() -> int:
            d = IncrementalDetokenizer(tok, STOP)
            if window:
                d.decoder = WindowDecoder(tok, True, True)
            for t in ids:
                d.add(t)
            d.flush()
            return len(ids)
        return go
    return {"before": run(True), "after": run(False)}


def _chunks():
    plain = {"id": "chatcmpl-7f3c2a", "object": "chat.completion.chunk", "created": 1760000000, "model": "smollm2",
             "choices": [{"index": 0, "delta": {"content": " Paris"}, "logprobs": None, "finish_reason": None}]}
    top = [{"token": t, "logprob": -0.1234567 * (k + 1), "bytes": list(t.encode())}
           for k, t in enumerate([" Paris", " Lyon", " the", " é", " 日本"])]
    with_lp = json.loads(json.dumps(plain))
    with_lp["choices"][0]["logprobs"] = {"content": [{"token": " Paris", "logprob": -0.1234567,
                                                      "bytes": [32, 80, 97, 114, 105, 115], "top_logprobs": top}]}
    whole = {"id": "chatcmpl-7f3c2a", "object": "chat.completion", "created": 1760000000, "model": "smollm2",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT},
                          "logprobs": {"content": [with_lp["choices"][0]["logprobs"]["content"][0]] * 256},
                          "finish_reason": "length"}],
             "usage": {"prompt_tokens": 20, "completion_tokens": 256, "total_tokens": 276}}
    return plain, with_lp, whole


def json_cases(count: int):
    from fastapi.responses import JSONResponse

    from neo_gateway.fast_json import FastJSONResponse, sse_event

    plain, with_lp, whole = _chunks()

    def loop(encode, value, n) -> Callable[[], int]:
        def go() -> int:
            for _ in range(n):
                encode(value)
            return n
        return go

    before_sse = lambda v: f"data: {json.dumps(v)}\n\n".encode("utf-8")  # noqa: E731
    return {
        "sse_chunk": {"before": loop(before_sse, plain, count), "after": loop(sse_event, plain, count)},
        "sse_chunk_logprobs": {"before": loop(before_sse, with_lp, count), "after": loop(sse_event, with_lp, count)},
        "response_256_logprobs": {"before": loop(JSONResponse, whole, max(1, count // 100)),
                                  "after": loop(FastJSONResponse, whole, max(1, count // 100))},
    }


def measure(cases: dict[str, dict[str, Callable[[], int]]], reps: int) -> dict:
    """Per case: every repetition's microseconds per item of both modes, their spreads, the verdict."""
    out = {}
    for name, modes in cases.items():
        for fn in modes.values():   # warm-up
            fn()
        runs: dict[str, list[float]] = {m: [] for m in modes}
        for _, mode in abba_order(list(modes), reps):
            runs[mode].append(_timer(modes[mode]) * 1e6)
        spreads = {m: Spread.of(v) for m, v in runs.items()}
        # the speed-up: before's time over after's (higher is better for "after"); and the same
        # ratio within each repetition (its two runs were back to back: a load that drifts over
        # the whole run moves both)
        paired = Spread.of(b / a for b, a in zip(runs["before"], runs["after"]))
        out[name] = {"us_per_item": runs, "spread": {m: s.to_dict() for m, s in spreads.items()},
                     "speedup": verdict(spreads["before"], spreads["after"]), "paired_speedup": paired.to_dict()}
    return out


def machine() -> dict:
    import orjson
    import tokenizers

    from neo_bench.neo_vs_gpu_only import cpu_model
    return {"cpu": cpu_model(), "usable_cpus": len(os.sched_getaffinity(0)), "loadavg_1m": os.getloadavg()[0],
            "python": platform.python_version(), "tokenizers": tokenizers.__version__, "orjson": orjson.__version__}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6))
    for ax, name in zip(axes, names):
        for x, mode in enumerate(("before", "after")):
            s = results[name]["spread"][mode]
            ax.bar(x, s["median"], color="#999" if mode == "before" else "#2a7",
                   yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]], capsize=4)
        ax.set_xticks([0, 1], ["before", "after"])
        p = results[name]["paired_speedup"]
        ax.set_title(f"{name}\nper repetition {p['median']:.2f}x [{p['min']:.2f}-{p['max']:.2f}]", fontsize=8)
        ax.set_ylabel("µs per item (median, min-max)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=4000, help="tokens detokenized per repetition")
    ap.add_argument("--chunks", type=int, default=20000, help="chunks encoded per repetition")
    ap.add_argument("--out", default=None, help="folder for the JSON and PNG")
    args = ap.parse_args(argv)
    if args.reps < 3:
        ap.error("--reps must be at least 3 (a spread needs them)")
    results = {"detokenize": measure({"detokenize": detokenize_cases(args.tokens)}, args.reps)["detokenize"]}
    results |= measure(json_cases(args.chunks), args.reps)
    print(f"{'case':24} {'before us (min/med/max)':28} {'after us (min/med/max)':28} "
          f"{'speed-up (medians)':36} per repetition (min/med/max)")
    for name, r in results.items():
        b, a, p = r["spread"]["before"], r["spread"]["after"], r["paired_speedup"]
        print(f"{name:24} {b['min']:7.2f}/{b['median']:7.2f}/{b['max']:7.2f}      "
              f"{a['min']:7.2f}/{a['median']:7.2f}/{a['max']:7.2f}      {describe(r['speedup']):36} "
              f"{p['min']:.2f}/{p['median']:.2f}/{p['max']:.2f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        report = {"machine": machine(), "reps": args.reps, "tokens": args.tokens, "chunks": args.chunks,
                  "results": results}
        with open(os.path.join(args.out, "gateway_hot_path.json"), "w") as f:
            json.dump(report, f, indent=1)
        plot(results, os.path.join(args.out, "gateway_hot_path.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
