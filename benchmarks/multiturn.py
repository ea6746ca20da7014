"""The multi-turn chat workload of `neo bench --workload multiturn`: conversations that resend their
whole history every turn, so a prefix cache can serve everything but the newest user turn.

``--num-conversations`` conversations arrive as a Poisson process (``--rates``: conversations per
second, ``inf`` = all at once; ``--burstiness`` as for requests) and run concurrently, each for
``--num-turns`` turns. Every conversation starts with the same system prompt of
``--system-prompt-len`` token ids (new per seed, so a repetition never finds an earlier one's in a
live server's cache). Turn t sends, as a token-id prompt through the completions API, the system
prompt, every earlier user turn followed by the model's *actual* answer (its token ids, read back
with ``logprobs=0`` and ``return_tokens_as_token_ids``: it works with dummy weights, whose text does
not re-tokenize to the same ids), and the new user turn; then the conversation thinks for an
exponential time of mean ``--think-time`` s. User turn and answer lengths are drawn per turn from
``--user-len``/``--answer-len`` with ``--user-len-dist``/``--answer-len-dist``: ``fixed``,
``uniform`` (+-``--range-ratio``) or ``exponential`` (that mean, clipped to [1, 8 x mean]).

Reported: TTFT p50/p99 of first turns and of later turns apart (the cache helps the latter), TPOT,
throughput, and the prefix-cache hit rates per tier over the run, from the server's /metrics scraped
before and after (hit tokens / queried tokens: ``vllm:prefix_cache_queries``,
``neo:prefix_cache_hits{tier}``), with the host tier's demoted/promoted bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import time

import numpy as np

from neo_bench.serve import arrival_gaps, summarize

LENGTH_DISTS = ("fixed", "uniform", "exponential")
SCRAPED = {  # report key -> (metric sample name, labels); counters are reported as deltas over the run
    "queried_tokens": ("vllm:prefix_cache_queries_total", {}),
    "hit_tokens_gpu": ("neo:prefix_cache_hits_total", {"tier": "gpu"}),
    "hit_tokens_host": ("neo:prefix_cache_hits_total", {"tier": "host"}),
    "demoted_bytes": ("neo:prefix_cache_demoted_bytes_total", {}),
    "promoted_bytes": ("neo:prefix_cache_promoted_bytes_total", {}),
}


def add_args(ap: argparse.ArgumentParser) -> None:
    """The workload's flags (also used by benchmarks/prefix_cache.py)."""
    g = ap.add_argument_group("multiturn workload (--workload multiturn; --rates are conversation arrivals/s)")
    g.add_argument("--num-conversations", type=int, default=16, help="conversations per rate (default: %(default)s)")
    g.add_argument("--num-turns", type=int, default=4, help="turns of each conversation (default: %(default)s)")
    g.add_argument("--system-prompt-len", type=int, default=1024,
                   help="token ids of the system prompt every conversation shares (default: %(default)s)")
    g.add_argument("--user-len", type=int, default=128, help="mean user-turn length (default: %(default)s)")
    g.add_argument("--user-len-dist", default="uniform", choices=LENGTH_DISTS,
                   help="user-turn lengths: fixed, uniform (+-range-ratio) or exponential (default: %(default)s)")
    g.add_argument("--answer-len", type=int, default=128, help="mean answer length, max_tokens (default: %(default)s)")
    g.add_argument("--answer-len-dist", default="uniform", choices=LENGTH_DISTS,
                   help="answer lengths, as --user-len-dist (default: %(default)s)")
    g.add_argument("--think-time", type=float, default=2.0,
                   help="mean seconds between an answer and the next turn, exponential; 0: none (default: %(default)s)")


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the workload's flags (None: nothing)."""
    if min(args.num_conversations, args.num_turns, args.user_len, args.answer_len) < 1:
        return "--num-conversations, --num-turns, --user-len and --answer-len must be >= 1"
    if args.system_prompt_len < 0 or args.think_time < 0:
        return "--system-prompt-len and --think-time must be >= 0"
    return None


def sample_lengths(rng: np.random.Generator, mean: int, dist: str, ratio: float, n: int) -> list[int]:
    if dist == "uniform":
        xs = rng.integers(int(mean * (1 - ratio)), int(mean * (1 + ratio)) + 1, n)
    elif dist == "exponential":
        xs = np.clip(np.rint(rng.exponential(mean, n)), 1, 8 * mean)
    else:
        xs = np.full(n, mean)
    return [max(1, int(x)) for x in xs]


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One conversation's script: its user turns (token ids), answer lengths, the think time
    before each turn (the first's is 0) and its arrival gap after the previous conversation."""

    index: int
    users: list[list[int]]
    answer_lens: list[int]
    think_s: list[float]
    gap_s: float


def make_conversations(args: argparse.Namespace, rate: float, seed: int) -> tuple[list[int], list[Conversation]]:
    """The shared system prompt and every conversation's script, all drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    n, turns = args.num_conversations, args.num_turns
    system = rng.integers(100, args.vocab, args.system_prompt_len).tolist()
    gaps = arrival_gaps(rate, args.burstiness, n, rng)
    convs = []
    for i in range(n):
        ulens = sample_lengths(rng, args.user_len, args.user_len_dist, args.range_ratio, turns)
        alens = sample_lengths(rng, args.answer_len, args.answer_len_dist, args.range_ratio, turns)
        think = [0.0] + (rng.exponential(args.think_time, turns - 1).tolist() if args.think_time > 0
                         else [0.0] * (turns - 1))
        convs.append(Conversation(i, [rng.integers(100, args.vocab, k).tolist() for k in ulens], alens, think,
                                  float(gaps[i])))
    return system, convs


async def one_turn(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed turn: `serve.one_request`'s record plus the answer's token ids."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    answer: list[int] = []
    error = None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, logprobs=0,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        async for chunk in stream:
            lp = chunk.choices[0].logprobs if chunk.choices else None
            if lp and lp.tokens:   # a chunk carries the ids of the tokens whose text it sends
                stamps.append(time.perf_counter())
                answer += [int(t.removeprefix("token_id:")) for t in lp.tokens]
    except Exception as exc:  # a failed turn ends its conversation; the run goes on
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    return {"start": t0, "ttft": (stamps[0] - t0) if stamps else None, "e2e": end - t0, "tokens": len(answer),
            "itl": list(np.diff(stamps)), "prompt_tokens": len(prompt), "error": error, "answer": answer}


async def run_conversation(client, model: str, system: list[int], conv: Conversation) -> list[dict]:
    """The conversation's turns in order, each resending the whole history with the answers received."""
    history = list(system)
    out = []
    for turn, (user, max_tokens, think) in enumerate(zip(conv.users, conv.answer_lens, conv.think_s)):
        await asyncio.sleep(think)
        prompt = history + user
        result = await one_turn(client, model, prompt, max_tokens)
        out.append({**result, "conversation": conv.index, "turn": turn})
        if result["error"] is not None:
            break
        history = prompt + result.pop("answer")
    return out


async def scrape(url: str) -> dict:
    """The prefix-cache counters of /metrics (None for a series the server does not export)."""
    import httpx

    from neo_bench.neo_vs_gpu_only import metric_value, parse_prometheus

    async with httpx.AsyncClient(timeout=30) as http:
        samples = parse_prometheus((await http.get(url + "/metrics")).text)
    out = {key: metric_value(samples, name, labels) for key, (name, labels) in SCRAPED.items()}
    out["host_blocks"] = metric_value(samples, "neo:prefix_cache_host_blocks")
    return out


def cache_report(before: dict, after: dict) -> dict:
    """Deltas of the counters over the run and the hit rate per tier (hit tokens / queried tokens)."""
    delta = {k: (after[k] - before[k]) if after.get(k) is not None and before.get(k) is not None else None
             for k in SCRAPED}
    queried = delta["queried_tokens"]
    rate = {tier: (delta[f"hit_tokens_{tier}"] / queried if queried and delta[f"hit_tokens_{tier}"] is not None
                   else None) for tier in ("gpu", "host")}
    total = sum(v for v in rate.values() if v is not None) if any(v is not None for v in rate.values()) else None
    return {**delta, "hit_rate": {**rate, "total": total}, "host_blocks_after": after.get("host_blocks")}


def _stats(xs) -> dict:
    xs = np.asarray([x for x in xs if x is not None], dtype=float)
    if xs.size == 0:
        return {}
    return {"mean": float(xs.mean()), "p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}


async def run_rate(args: argparse.Namespace, url: str, model: str, rate: float, seed: int) -> dict:
    """Every conversation at ``rate`` conversations/s; the summary of `neo bench` over all turns plus
    first vs later turns' TTFT, the expected turns, and the prefix cache's figures over the run."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    system, convs = make_conversations(args, rate, seed)
    before = await scrape(url)
    tasks = []
    t0 = time.perf_counter()
    for conv in convs:
        await asyncio.sleep(conv.gap_s)
        tasks.append(asyncio.create_task(run_conversation(client, model, system, conv)))
    results = [r for turns in await asyncio.gather(*tasks) for r in turns]
    wall = time.perf_counter() - t0
    after = await scrape(url)
    await client.close()
    expected = args.num_conversations * args.num_turns
    summary = summarize(results, wall, args.slo)
    summary["failed"] = expected - summary["completed"]   # turns never sent after a failed one count too
    ok = [r for r in results if r["error"] is None]
    return {"rate": rate, **summary, "turns_expected": expected,
            "ttft_first_turn_s": _stats(r["ttft"] for r in ok if r["turn"] == 0),
            "ttft_later_turns_s": _stats(r["ttft"] for r in ok if r["turn"] > 0),
            "prompt_tokens_later_turns": sum(r["prompt_tokens"] for r in ok if r["turn"] > 0),
            "prefix_cache": cache_report(before, after),
            "turns": [{k: r[k] for k in ("conversation", "turn", "prompt_tokens", "tokens", "ttft", "e2e", "error")}
                      for r in sorted(results, key=lambda r: (r["conversation"], r["turn"]))]}


def run(args: argparse.Namespace, rate: float, seed: int, url: str | None = None, model: str | None = None) -> dict:
    return asyncio.run(run_rate(args, url or args.url, model or args.model, rate, seed))


def table(runs: list[dict]) -> str:
    """One line per rate: turns, throughput, TTFT of first and later turns, TPOT, hit rates."""
    def ms(d: dict, q: str) -> float:
        return d.get(q, math.nan) * 1e3

    def pct(x) -> str:
        return f"{100 * x:5.1f}%" if x is not None else "    -"

    lines = [f"{'rate':>6} {'turns':>5} {'fail':>4} {'tok/s':>8} {'TTFT 1st p50/p99 ms':>19} "
             f"{'TTFT later p50/p99 ms':>21} {'TPOT p50/p99 ms':>17} {'hit gpu':>7} {'hit host':>8}"]
    for r in runs:
        hit = r["prefix_cache"]["hit_rate"]
        lines.append(f"{r['rate']:>6g} {r['completed']:>5} {r['failed']:>4} {r['output_throughput']:>8.1f} "
                     f"{ms(r['ttft_first_turn_s'], 'p50'):>9.0f}/{ms(r['ttft_first_turn_s'], 'p99'):<9.0f} "
                     f"{ms(r['ttft_later_turns_s'], 'p50'):>10.0f}/{ms(r['ttft_later_turns_s'], 'p99'):<10.0f} "
                     f"{ms(r['tpot_s'], 'p50'):>8.1f}/{ms(r['tpot_s'], 'p99'):<8.1f} "
                     f"{pct(hit['gpu']):>7} {pct(hit['host']):>8}")
    return "\n".join(lines)
