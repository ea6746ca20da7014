"""Prefix caching end to end: multi-turn chats over a shared system prompt give the same greedy
answers with the cache as without it, and the replica with the cache prefills far fewer tokens."""

from __future__ import annotations

import pytest

from support.cost_tables import synthetic
from support.prefix_cache import chat, uncached_then_cached

pytestmark = pytest.mark.integration

SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence. "
          "Never invent tracking numbers. Prices are in euros. Offices open from nine to five. ") * 3
QUESTIONS = [["Where is my parcel?", "And when will it arrive?"],
             ["How much is a small box?", "And a large one?"],
             ["Are you open on Sunday?", "What about Saturday?"]]


def conversations(url: str) -> list[list[str]]:
    """Each conversation resends the whole history every turn, as chat clients do."""
    out = []
    for turns in QUESTIONS:
        messages, answers = [{"role": "system", "content": SYSTEM}], []
        for question in turns:
            messages.append({"role": "user", "content": question})
            answers.append(chat(url, messages, max_tokens=16))
            messages.append({"role": "assistant", "content": answers[-1]})
        out.append(answers)
    return out


@pytest.mark.parametrize("offload", [False, True], ids=["gpu-only", "offload-auto"])
def test_cached_prefixes_give_the_answers_computed_ones_give(offload, replica_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("NEO_COST_CACHE_DIR", str(tmp_path / "cost"))
    common = ["--max-model-len", "1024", "--num-gpu-blocks", "128"]
    if offload:
        tables = synthetic().save(str(tmp_path / "tables.json"))   # no profiling at start: the policy is not under test
        common += ["--offload-mode", "auto", "--num-cpu-blocks", "128", "--kv-cache-dtype", "bfloat16",
                   "--cpu-threads", "1", "--cost-tables", tables]
    expected, cached = uncached_then_cached(replica_factory, common, conversations)
    assert conversations(cached.url) == expected
    hits, queries = cached.metric("vllm:prefix_cache_hits_total"), cached.metric("vllm:prefix_cache_queries_total")
    # every turn after the first shares the system prompt and the history with an earlier request
    assert hits >= 0.5 * queries > 0, (hits, queries)
    assert conversations(cached.url) == expected, "a second round, now almost wholly cached"
