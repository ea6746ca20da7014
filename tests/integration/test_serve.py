"""`neo serve` with the default model, driven over real HTTP by the official `openai` client.

The replica (shared with the other integration modules) has a GPU KV pool of only 48 blocks, so 32
concurrent requests force preemption (recompute): answers must still equal the prompts served alone.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from neo_common.model_source import embedded_gguf_path
from neo_gateway.tokenizer import TextTokenizer
from support.clients import async_openai_client, openai_client
from support.replica import SMALL_POOL_BLOCKS as POOL_BLOCKS

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def replica(small_pool_replica):
    return small_pool_replica


@pytest.fixture(scope="module")
def client(replica):
    return openai_client(replica.url)


def test_chat_answers_the_capital_of_france(client):
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=24,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_models_health_ready(replica, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(replica.url + "/health").json()
    assert health["status"] == "ok" and health["workers"]["gpu_worker"]["pid"] > 0
    assert httpx.get(replica.url + "/ready").status_code == 200


def test_streaming_equals_non_streaming_with_usage_and_done(replica, client):
    kw = dict(model=MODEL, prompt="Three facts about the Moon:", temperature=0, max_tokens=20)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    raw = httpx.post(replica.url + "/v1/chat/completions", timeout=120,
                     json={"model": MODEL, "stream": True, "max_tokens": 5, "temperature": 0,
                           "messages": [{"role": "user", "content": "Hi"}]}).text
    lines = [ln for ln in raw.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_stop_strings_and_stop_token_ids(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12).choices[0].text
    assert "6" in base, base
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12, stop=["6"])
    assert cut.choices[0].text == base[:base.index("6")] and cut.choices[0].finish_reason == "stop"
    five = TextTokenizer.from_gguf(embedded_gguf_path()).encode("5")
    assert len(five) == 1
    stop_id = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12,
                                        extra_body={"stop_token_ids": five})
    assert stop_id.choices[0].finish_reason == "stop" and stop_id.usage.completion_tokens == 2  # " ", "5"


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt="My favourite animal is", temperature=1.0, top_p=0.9, max_tokens=12, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    others = {client.completions.create(**(kw | {"seed": s})).choices[0].text for s in range(4)}
    assert len(others) > 1


@pytest.mark.timeout(1800)  # 64 generations of the 135M model on a 2-core CPU
def test_32_concurrent_mixed_lengths_equal_alone_and_free_all_blocks(replica, client):
    topics = ["the sea", "mountains", "a cat", "python code", "the sun", "bread", "music", "rain"]
    prompts = [f"Write about {topics[i % 8]}. " * (3 + 2 * (i % 5)) for i in range(32)]  # 18..66 tokens
    # Outputs long enough that requests overlap in the 48-block pool whatever the arrival timing
    # (with short ones, staggered arrivals let early requests finish first and nothing preempts).
    lengths = [40 + (i * 5) % 12 for i in range(32)]
    aclient = async_openai_client(replica.url, timeout=600)

    async def one(p: str, n: int) -> str:
        r = await aclient.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=n)
        return r.choices[0].text

    async def together() -> list[str]:
        return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))

    concurrent = asyncio.run(together())
    assert replica.metric("vllm:num_preemptions_total") > 0, "the small pool should have forced preemption"
    alone = [client.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=n).choices[0].text
             for p, n in zip(prompts, lengths)]
    assert concurrent == alone
    assert replica.metric("neo:gpu_kv_blocks_free") == POOL_BLOCKS
    assert replica.metric("vllm:num_requests_running") == 0 and replica.metric("vllm:num_requests_waiting") == 0
