"""The prefix cache's host tier end to end: conversations whose earlier turns left the GPU pool come
back from the host pool, and answer exactly as a replica without any cache does.

Two paths, each against a real replica with the cache on and one with it off (greedy, token for
token): ``auto`` with a GPU pool too small for three conversations, so each one's blocks are evicted
by the others, demoted to the host pool and swapped in when its next turn arrives; ``full`` (every
decode on the CPU), where a returning conversation is placed on the CPU and decodes against its
host blocks directly, its new tokens fed one per iteration (tables with a slow GPU prefill, so the
scheduler's rule takes that path on an idle replica).
"""

from __future__ import annotations

import dataclasses

import pytest

from support.cost_tables import synthetic
from support.prefix_cache import chat, uncached_then_cached

pytestmark = pytest.mark.integration

SYSTEMS = [f"You are the assistant of the {name} office. Answer in one short sentence. Never invent numbers. "
           f"Opening hours are nine to five on weekdays. The {name} office handles parcels and letters. " * 2
           for name in ("harbour", "airport", "station")]
TURNS = ["Where is my parcel?", "And when will it arrive?", "Can I pick it up myself?"]


def conversations(url: str) -> list[list[str]]:
    """Turn t of every conversation, then turn t + 1 of every one: each conversation's history has
    been pushed out of the GPU pool by the other two by the time it comes back."""
    history = [[{"role": "system", "content": s}] for s in SYSTEMS]
    answers: list[list[str]] = [[] for _ in SYSTEMS]
    for question in TURNS:
        for i, messages in enumerate(history):
            messages.append({"role": "user", "content": question})
            answers[i].append(chat(url, messages, max_tokens=12))
            messages.append({"role": "assistant", "content": answers[i][-1]})
    return answers


def tables(path: str, slow_prefill: bool) -> str:
    costs = synthetic()
    if slow_prefill:   # 50 us per token and layer of dense work: recomputing a history outweighs extra steps
        costs = dataclasses.replace(costs, linr_y=[130e-6 + 50e-6 * s for s in costs.linr_x])
    return costs.save(path)


@pytest.mark.parametrize("mode", ["auto", "full"], ids=["swap-in", "cpu-direct"])
def test_host_tier_hits_give_the_answers_an_uncached_replica_gives(mode, replica_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("NEO_COST_CACHE_DIR", str(tmp_path / "cost"))
    common = ["--max-model-len", "1024", "--offload-mode", mode, "--num-cpu-blocks", "256",
              "--kv-cache-dtype", "bfloat16", "--cpu-threads", "1", "--max-num-batched-tokens", "1024",
              "--calibrate-pipeline", "false",
              "--num-gpu-blocks", "24" if mode == "auto" else "64",
              "--cost-tables", tables(str(tmp_path / "tables.json"), slow_prefill=mode == "full")]
    expected, cached = uncached_then_cached(replica_factory, common, conversations)
    assert conversations(cached.url) == expected
    host_hits = cached.metric("neo:prefix_cache_hits_total", tier="host")
    promoted = cached.metric("neo:prefix_cache_promoted_bytes_total")
    assert host_hits > 0, "later turns found their history in the host tier"
    if mode == "auto":
        assert cached.metric("neo:prefix_cache_demoted_bytes_total") > 0, "evicted GPU blocks were demoted"
        assert promoted > 0, "and swapped back in"
    else:
        assert promoted == 0, "CPU-resident requests attend the host blocks where they are"
    assert cached.metric("vllm:num_requests_running") == 0
