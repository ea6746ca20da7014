"""End-to-end prefix-cache tests: the same chats answered by a replica with the cache off, then by
one with it on (greedy, so the answers must agree token for token)."""

from __future__ import annotations

from typing import Callable

import httpx

from support.replica import Replica

MODEL = "smollm2-135m-instruct"


def chat(url: str, messages: list[dict], max_tokens: int) -> str:
    resp = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def uncached_then_cached(replica_factory, args: list[str], converse: Callable[[str], list]) -> tuple[list, Replica]:
    """``converse``'s answers from a replica started with ``args`` and prefix caching off (stopped once
    it has answered: one replica at a time on a small machine), and a running replica with the same
    ``args`` and the cache on, to answer the same conversations."""
    plain = replica_factory(*args, "--enable-prefix-caching", "false")
    expected = converse(plain.url)
    assert plain.metric("vllm:prefix_cache_hits_total") == 0, "a replica without the cache reports no hits"
    plain.stop()
    return expected, replica_factory(*args)
