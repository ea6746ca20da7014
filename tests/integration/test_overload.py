"""Beyond the waiting-queue bound, requests get 429 with Retry-After; accepted ones all complete."""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


def test_overload_gets_429_not_crashes_and_accepted_requests_complete(replica_factory):
    r = replica_factory("--num-gpu-blocks", "64", "--max-num-seqs", "2", "--max-waiting", "2")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"model": MODEL, "prompt": "Count to ten:", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(*(client.post(r.url + "/v1/completions", json=body) for _ in range(12)))

    responses = asyncio.run(burst())  # 12 at once against 2 running + 2 waiting: about 3x capacity
    codes = [resp.status_code for resp in responses]
    assert set(codes) <= {200, 429}, codes
    rejected = [resp for resp in responses if resp.status_code == 429]
    accepted = [resp for resp in responses if resp.status_code == 200]
    assert rejected and accepted
    for resp in rejected:
        assert resp.headers.get("retry-after") and resp.json()["error"]["type"] == "rate_limit_error"
    assert all(resp.json()["usage"]["completion_tokens"] == 8 for resp in accepted)
    assert httpx.get(r.url + "/health").status_code == 200
    assert r.metric("neo:gpu_kv_blocks_free") == 64 and r.metric("vllm:num_requests_waiting") == 0
