"""Logprobs through the official ``openai`` client on a real replica, against ``transformers``'
log-softmax of the same model's logits: completions and chat, streamed and not, ``echo`` and vLLM's
``prompt_logprobs``, top-k order, ``best_of`` ranking by cumulative logprob (sharing the prompt's
blocks), and the bad inputs (400 naming the field)."""

from __future__ import annotations

import os
import uuid

import openai
import pytest
import torch

from neo_common.model_source import embedded_gguf_path
from support.clients import openai_client

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
TOL = 1e-2   # float32 on both sides; logits agree to ~2e-3 (test_model_equivalence)
IDS = {"return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def replica(small_pool_replica):
    return small_pool_replica


@pytest.fixture(scope="module")
def client(replica):
    return openai_client(replica.url)


@pytest.fixture(scope="module")
def ref():
    folder, name = os.path.split(embedded_gguf_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


def ref_logprobs(ref, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is the log-softmax predicting the token after position p."""
    with torch.no_grad():
        return torch.log_softmax(ref[0](torch.tensor([ids])).logits[0].double(), -1)


def tid(token: str) -> int:
    assert token.startswith("token_id:"), token
    return int(token.split(":", 1)[1])


def check_completion_logprobs(lp, ids: list[int], first: int, ref, k: int) -> None:
    """``lp`` (completions shape) covers ``ids[first:]``, each predicted by the reference."""
    want = ref_logprobs(ref, ids)
    for i, (token, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        pos = first + i
        assert tid(token) == ids[pos]
        if pos == 0:
            assert value is None and top is None
            continue
        row = want[pos - 1]
        assert value == pytest.approx(float(row[ids[pos]]), abs=TOL)
        best = row.topk(k).indices.tolist()
        assert [tid(t) for t in top][:k] == best      # likeliest first
        assert list(top.values()) == sorted(top.values(), reverse=True)
        assert set(map(tid, top)) == set(best) | {ids[pos]}
        for t, v in top.items():
            assert v == pytest.approx(float(row[tid(t)]), abs=TOL)


def test_completion_logprobs_equal_the_reference(client, ref):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                    extra_body=IDS)
    lp = out.choices[0].logprobs
    prompt_ids = ref[1](PROMPT)["input_ids"]
    gen = [tid(t) for t in lp.tokens]
    assert len(gen) == out.usage.completion_tokens == 5
    check_completion_logprobs(lp, prompt_ids + gen, len(prompt_ids), ref, 3)
    assert lp.text_offset[0] == 0


def test_completion_token_texts_and_offsets_spell_the_text(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1)
    choice = out.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_streamed_completion_logprobs_equal_the_whole_ones(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    whole = client.completions.create(**kw).choices[0].logprobs
    tokens, values, offsets, text = [], [], [], ""
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert tokens == whole.tokens and values == whole.token_logprobs and offsets == whole.text_offset
    assert "".join(tokens) == text


def test_echo_returns_the_prompt_and_its_logprobs(client, ref):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True,
                                    extra_body=IDS)
    choice = out.choices[0]
    prompt_ids = ref[1](PROMPT)["input_ids"]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    ids = [tid(t) for t in lp.tokens]
    assert ids[:len(prompt_ids)] == prompt_ids and len(ids) == len(prompt_ids) + 3
    check_completion_logprobs(lp, ids, 0, ref, 2)


def test_echo_streams_the_prompt_first(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                            stream=True))
    first = next(c for ch in chunks for c in ch.choices)
    assert first.text.startswith(PROMPT)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert "".join(c.text for ch in chunks for c in ch.choices) == whole.choices[0].text


def test_prompt_logprobs_equal_the_reference(client, ref, replica):
    # a prompt no other test sent: a cached prefix would be skipped, and these need every position
    prompt = f"Note {uuid.uuid4().hex[:8]}: " + "the quick brown fox jumps over the lazy dog. " * 3
    prompt_ids = ref[1](prompt)["input_ids"]
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)   # now cached
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": 2})
    plp = out.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(prompt_ids) and plp[0] is None
    want = ref_logprobs(ref, prompt_ids)
    for pos in range(1, len(prompt_ids)):
        entry = plp[pos]
        row = want[pos - 1]
        token = str(prompt_ids[pos])
        assert entry[token]["logprob"] == pytest.approx(float(row[prompt_ids[pos]]), abs=TOL)
        mine = float(row[prompt_ids[pos]])   # rank: 1 + the tokens likelier (up to float noise)
        assert int((row > mine + TOL).sum()) <= entry[token]["rank"] - 1 <= int((row > mine - TOL).sum())
        best = row.topk(2).indices.tolist()
        assert [int(t) for t in entry][:2] == best


def chat_ids(ref, messages) -> list[int]:
    text = ref[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return ref[1](text, add_special_tokens=False)["input_ids"]


MSG = [{"role": "user", "content": "Name a colour."}]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_the_reference(client, ref, stream):
    kw = dict(model=MODEL, messages=MSG, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, extra_body=IDS)
    if stream:
        content = []
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                if c.logprobs is not None:
                    content += c.logprobs.content
    else:
        out = client.chat.completions.create(**kw)
        content = out.choices[0].logprobs.content
    ids = chat_ids(ref, MSG)
    assert stream or out.usage.prompt_tokens == len(ids)
    gen = [tid(e.token) for e in content]
    assert len(gen) == 5
    want = ref_logprobs(ref, ids + gen)
    for i, e in enumerate(content):
        row = want[len(ids) + i - 1]
        assert e.logprob == pytest.approx(float(row[gen[i]]), abs=TOL)
        assert [tid(t.token) for t in e.top_logprobs] == row.topk(3).indices.tolist()
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=TOL)
        assert e.bytes == list(e.token.encode())


def test_chat_token_texts_spell_the_content(client):
    out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=8, temperature=0, logprobs=True)
    content = out.choices[0].logprobs.content
    assert all(e.top_logprobs == [] for e in content)
    text = "".join(e.token for e in content)
    assert text.startswith(out.choices[0].message.content)


def test_best_of_returns_the_n_with_the_highest_cumulative_logprob(client, replica):
    """Seeded: sequence i of best_of draws from seed + i, as choice i of n does, so the same request
    with n = best_of shows every candidate; best_of returns the two likeliest, best first. The
    candidates take the prompt's blocks from the prefix cache."""
    prompt = f"Story {uuid.uuid4().hex[:8]}. " + "Once upon a time there was a little fox who lived in the woods. " * 5
    kw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, seed=11)
    before = replica.metric("vllm:prefix_cache_hits_total")
    best = client.completions.create(n=2, best_of=4, **kw)
    hits = replica.metric("vllm:prefix_cache_hits_total") - before
    every = client.completions.create(n=4, logprobs=0, **kw)
    scored = sorted(((sum(c.logprobs.token_logprobs), c.text) for c in every.choices), reverse=True)
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == [t for _, t in scored[:2]]
    assert best.choices[0].logprobs is None           # not asked: ranking computes them internally
    assert hits >= 3 * 64                               # three followers x the prompt's full blocks


@pytest.mark.parametrize("endpoint,fields,param", [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"n": 3, "best_of": 2}, "best_of"),
    ("completions", {"best_of": 2, "stream": True}, "best_of"),
    ("chat", {"n": 2, "stream": True, "extra_body": {"best_of": 3}}, "best_of"),
    ("completions", {"extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs")])
def test_bad_logprob_requests_get_400_naming_the_field(client, endpoint, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, **fields)
        else:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **fields)
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
