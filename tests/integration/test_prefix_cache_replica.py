"""Prefix caching end to end: multi-turn chats over a shared system prompt give the same greedy
answers with the cache as without it, and the replica with the cache prefills far fewer tokens."""

from __future__ import annotations

import httpx
import pytest

from support.cost_tables import synthetic

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence. "
          "Never invent tracking numbers. Prices are in euros. Offices open from nine to five. ") * 3
QUESTIONS = [["Where is my parcel?", "And when will it arrive?"],
             ["How much is a small box?", "And a large one?"],
             ["Are you open on Sunday?", "What about Saturday?"]]


def chat(url: str, messages: list[dict]) -> str:
    resp = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def conversations(url: str) -> list[list[str]]:
    """Each conversation resends the whole history every turn, as chat clients do."""
    out = []
    for turns in QUESTIONS:
        messages, answers = [{"role": "system", "content": SYSTEM}], []
        for question in turns:
            messages.append({"role": "user", "content": question})
            answers.append(chat(url, messages))
            messages.append({"role": "assistant", "content": answers[-1]})
        out.append(answers)
    return out


def counter(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


@pytest.mark.parametrize("offload", [False, True], ids=["gpu-only", "offload-auto"])
def test_cached_prefixes_give_the_answers_computed_ones_give(offload, replica_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("NEO_COST_CACHE_DIR", str(tmp_path / "cost"))
    common = ["--max-model-len", "1024", "--num-gpu-blocks", "128"]
    if offload:
        tables = synthetic().save(str(tmp_path / "tables.json"))   # no profiling at start: the policy is not under test
        common += ["--offload-mode", "auto", "--num-cpu-blocks", "128", "--kv-cache-dtype", "bfloat16",
                   "--cpu-threads", "1", "--cost-tables", tables]
    plain = replica_factory(*common, "--enable-prefix-caching", "false")
    expected = conversations(plain.url)
    assert counter(plain.url, "vllm:prefix_cache_hits_total") == 0
    plain.stop()
    cached = replica_factory(*common)
    assert conversations(cached.url) == expected
    hits, queries = counter(cached.url, "vllm:prefix_cache_hits_total"), counter(cached.url, "vllm:prefix_cache_queries_total")
    # every turn after the first shares the system prompt and the history with an earlier request
    assert hits >= 0.5 * queries > 0, (hits, queries)
    assert conversations(cached.url) == expected, "a second round, now almost wholly cached"
