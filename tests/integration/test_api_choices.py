"""Gateway-side fields through the official ``openai`` client on a real replica: ``n``, a list of
prompts, ``min_tokens``, ``skip_special_tokens``, ``include_stop_str_in_output``."""

from __future__ import annotations

import uuid

import pytest

from neo_common.model_source import embedded_gguf_path
from neo_gateway.tokenizer import TextTokenizer
from support.clients import openai_client

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
COUNT = "1, 2, 3, 4,"


@pytest.fixture(scope="module")
def replica(small_pool_replica):
    return small_pool_replica


@pytest.fixture(scope="module")
def client(replica):
    return openai_client(replica.url)


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.from_gguf(embedded_gguf_path())


def complete(client, prompt, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, **({"temperature": 0, "max_tokens": 8} | kw))


def test_a_list_of_prompts_gets_one_choice_each_in_order(client):
    prompts = ["The capital of France is", "My favourite colour is", COUNT]
    alone = [complete(client, p) for p in prompts]
    out = complete(client, prompts)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [a.choices[0].text for a in alone]
    assert out.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert out.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


def test_n_greedy_gives_n_copies_of_the_greedy_text(client):
    msg = [{"role": "user", "content": "Name a fruit."}]
    one = client.chat.completions.create(model=MODEL, messages=msg, temperature=0, max_tokens=10)
    three = client.chat.completions.create(model=MODEL, messages=msg, temperature=0, max_tokens=10, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_n_seeded_samples_are_independent_and_reproducible(client):
    kw = dict(temperature=1.0, max_tokens=12, seed=4321)
    a = complete(client, "Once upon a time", n=4, **kw)
    b = complete(client, "Once upon a time", n=4, **kw)
    texts = [c.text for c in a.choices]
    assert texts == [c.text for c in b.choices]
    assert len(set(texts)) > 1
    assert texts[0] == complete(client, "Once upon a time", **kw).choices[0].text


def test_n_with_several_prompts_indexes_prompt_major(client):
    out = complete(client, ["The sky is", COUNT], n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text == complete(client, "The sky is").choices[0].text
    assert out.choices[2].text == out.choices[3].text == complete(client, COUNT).choices[0].text


@pytest.mark.parametrize("chat", [False, True])
def test_n_streams_every_choice(client, chat):
    if chat:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=8)
        whole = client.chat.completions.create(n=2, **kw)
        chunks = list(client.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True}, **kw))
        texts = {0: "", 1: ""}
        for ch in chunks:
            for c in ch.choices:
                texts[c.index] += c.delta.content or ""
        assert [texts[i] for i in (0, 1)] == [c.message.content for c in whole.choices]
    else:
        whole = complete(client, "The sky is", n=2)
        chunks = list(complete(client, "The sky is", n=2, stream=True, stream_options={"include_usage": True}))
        texts = {0: "", 1: ""}
        for ch in chunks:
            for c in ch.choices:
                texts[c.index] += c.text
        assert [texts[i] for i in (0, 1)] == [c.text for c in whole.choices]
    finals = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert len(finals) == 2
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_shares_the_prompts_blocks_through_the_prefix_cache(client, replica, tok):
    prompt = f"Note {uuid.uuid4().hex}. " + "The quick brown fox jumps over the lazy dog. " * 8
    length = len(tok.encode(prompt))
    shareable = (length - 1) // 16 * 16   # full blocks before the last prompt token's
    assert shareable >= 64
    before = replica.metric("vllm:prefix_cache_hits_total")
    out = complete(client, prompt, n=4, max_tokens=4)
    assert len(out.choices) == 4
    assert replica.metric("vllm:prefix_cache_hits_total") - before >= 3 * shareable


def test_min_tokens_generates_past_the_stop_token(client):
    msg = [{"role": "user", "content": "Say hi."}]
    plain = client.chat.completions.create(model=MODEL, messages=msg, temperature=0, max_tokens=60)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 40
    held = client.chat.completions.create(model=MODEL, messages=msg, temperature=0, max_tokens=60,
                                          extra_body={"min_tokens": 40})
    assert held.usage.completion_tokens >= 40
    assert held.choices[0].message.content.startswith(plain.choices[0].message.content)


def test_skip_special_tokens_false_shows_them(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=40)
    shown = client.chat.completions.create(**kw, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    hidden = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert "<|im_end|>" in shown.choices[0].message.content
    assert "<|im_end|>" not in hidden.choices[0].message.content


def test_include_stop_str_in_output_keeps_stop_strings_and_stop_tokens(client, tok):
    base = complete(client, COUNT, max_tokens=12).choices[0].text
    assert "6" in base
    kept = complete(client, COUNT, max_tokens=12, stop=["6"], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == base[:base.index("6") + 1] and kept.choices[0].finish_reason == "stop"
    five = tok.encode("5")
    cut = complete(client, COUNT, max_tokens=12, extra_body={"stop_token_ids": five})
    with_token = complete(client, COUNT, max_tokens=12, extra_body={"stop_token_ids": five,
                                                                      "include_stop_str_in_output": True})
    assert cut.choices[0].finish_reason == with_token.choices[0].finish_reason == "stop"
    assert with_token.choices[0].text == cut.choices[0].text + "5"
