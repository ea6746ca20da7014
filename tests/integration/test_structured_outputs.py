"""Structured outputs end to end: a real replica of the embedded SmolLM2-135M, the official
``openai`` client. 50 JSON schemas of varied shapes (nested objects, enums, arrays, bounded numbers
and strings), sent concurrently: every output parses and validates; regexes, choices and a grammar
likewise; the client's ``parse`` helper with a pydantic model; streaming; invalid constraints are a
400 naming their field; a grammar that cannot finish within max_tokens ends with ``length``."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Reply with a JSON object."}]
NAMES = ["name", "city", "color", "size", "count", "score", "level", "kind", "price", "rank", "owner", "label"]
WORDS = ["red", "green", "blue", "small", "large", "cat", "dog", "north", "south", "yes", "no", "alpha", "beta"]


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "minLength": 1, "maxLength": rng.randint(2, 6)}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 90)}
    if kind == "number":   # multipleOf bounds the digits: a bare number lets a small model write 1.0000...
        lo = rng.randint(-10, 10)
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 100), "multipleOf": 0.5}
    if kind == "boolean":
        return {"type": "boolean"}
    return {"enum": rng.sample(WORDS, rng.randint(2, 4))}


def _object(rng: random.Random, depth: int, width: int) -> dict:
    props = {}
    for name in rng.sample(NAMES, width):
        roll = rng.random()
        if depth < 1 and roll < 0.3:
            props[name] = _object(rng, depth + 1, rng.randint(1, 2))
        elif roll < 0.45:
            props[name] = {"type": "array", "items": _leaf(rng), "minItems": 1, "maxItems": 2}
        else:
            props[name] = _leaf(rng)
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def schemas(n: int, seed: int = 0) -> list[dict]:
    """``n`` JSON schemas of varied shapes, small enough that a complete object fits max_tokens."""
    rng = random.Random(seed)
    return [_object(rng, 0, rng.randint(1, 3)) for _ in range(n)]


@pytest.fixture(scope="module")
def replica(replica_factory_module):
    return replica_factory_module("--num-gpu-blocks", "640", "--max-model-len", "512", "--max-num-seqs", "64")


@pytest.fixture(scope="module")
def replica_factory_module(tmp_path_factory):
    from support.replica import Replica

    started = []

    def start(*args: str):
        r = Replica(list(args), str(tmp_path_factory.mktemp("so") / "serve.log"))
        started.append(r)
        r.wait_ready()
        return r

    yield start
    for r in started:
        r.stop()


@pytest.fixture(scope="module")
def client(replica):
    return openai.OpenAI(base_url=replica.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _gather(replica, calls):
    """Run ``calls`` (coroutine factories taking an AsyncOpenAI) concurrently."""
    async def go():
        async with openai.AsyncOpenAI(base_url=replica.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=300) as aclient:
            return await asyncio.gather(*(call(aclient) for call in calls))
    return asyncio.run(go())


def _schema_field(i: int, schema: dict) -> dict:
    """The same constraint through each of the API's spellings, in turn."""
    spelled = [{"response_format": {"type": "json_schema",
                                    "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}},
               {"extra_body": {"guided_json": schema}},
               {"extra_body": {"structured_outputs": {"json": schema}}},
               {"extra_body": {"guided_json": json.dumps(schema)}}]
    return spelled[i % len(spelled)]


def test_fifty_json_schemas_concurrently_all_parse_and_validate(replica):
    shapes = schemas(50)
    t0 = time.monotonic()
    outs = _gather(replica, [
        (lambda c, i=i, s=s: c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100, temperature=0,
                                                       **_schema_field(i, s)))
        for i, s in enumerate(shapes)])
    elapsed = time.monotonic() - t0
    for schema, out in zip(shapes, outs):
        choice = out.choices[0]
        assert choice.finish_reason == "stop", (choice.message.content, schema)
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert out.usage.completion_tokens < 100
    kinds = {json.dumps(sorted(p.get("type", "enum") for p in s["properties"].values())) for s in shapes}
    assert len(kinds) > 10, "the shapes vary"
    assert elapsed < 120, elapsed


def test_sampled_outputs_validate_too(replica):
    shapes = schemas(6, seed=1)
    outs = _gather(replica, [
        (lambda c, i=i, s=s: c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100, temperature=1.0,
                                                       seed=i, extra_body={"guided_json": s}))
        for i, s in enumerate(shapes)])
    for schema, out in zip(shapes, outs):
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_constrained_requests_launch_ahead_like_any_other(replica):
    """A batch of constrained requests alone keeps the worker's launch-ahead pipeline full: each
    plan scheduled ahead carries deferred masks the engine sends once the previous tokens advanced
    the grammars (before, such a batch ran without launch-ahead). Every output holds its grammar."""
    pattern = r"[a-z]{400}"   # more letters than 40 tokens write: every request ends by length

    def counters():
        return (replica.metric("neo:worker_launched_ahead_total"),
                replica.metric("neo:iteration_duration_seconds_count"))

    _gather(replica, [lambda c: c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)])  # series exist
    ahead0, iterations0 = counters()
    outs = _gather(replica, [
        (lambda c, i=i: c.completions.create(model=MODEL, prompt=f"Item {i}:", max_tokens=40, temperature=0,
                                             extra_body={"guided_regex": pattern}))
        for i in range(8)])
    ahead1, iterations1 = counters()
    for out in outs:
        choice = out.choices[0]
        assert choice.finish_reason == "length" and out.usage.completion_tokens == 40
        assert re.fullmatch(r"[a-z]*", choice.text) and len(choice.text) >= 40, choice.text
    iterations = iterations1 - iterations0
    # (most are launched ahead; a quarter leaves room for a loaded machine; the old scheduler: none)
    assert iterations >= 40 and ahead1 - ahead0 >= iterations / 4, (ahead1 - ahead0, iterations)


REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no), because [a-z]{2,8}", r"[A-Z][a-z]{2,6} [0-9]{1,2}",
           r"#[0-9a-f]{6}", r"[0-9]{1,4}\.[0-9]{2}", r"[a-z]{1,10}@[a-z]{1,10}\.(com|org)"]
CHOICES = [["yes", "no"], ["red", "green", "blue"], ["Paris", "London", "Rome", "Madrid"], ["a b c", "d e"]]


def test_regexes_and_choices_hold_for_completions_and_chat(replica):
    calls = []
    for i, rx in enumerate(REGEXES):
        calls.append(lambda c, rx=rx, i=i: c.completions.create(
            model=MODEL, prompt="Answer:", max_tokens=30, temperature=0.7, seed=i, extra_body={"guided_regex": rx}))
        calls.append(lambda c, rx=rx: c.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=30, temperature=0, extra_body={"structured_outputs": {"regex": rx}}))
    for i, options in enumerate(CHOICES):
        calls.append(lambda c, o=options, i=i: c.completions.create(
            model=MODEL, prompt="Pick one:", max_tokens=20, temperature=1.0, seed=i, extra_body={"guided_choice": o}))
        calls.append(lambda c, o=options: c.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=20, temperature=0, extra_body={"guided_choice": o}))
    outs = _gather(replica, calls)
    texts = [o.choices[0].text if hasattr(o.choices[0], "text") else o.choices[0].message.content for o in outs]
    expected = [rx for rx in REGEXES for _ in (0, 1)] + [options for options in CHOICES for _ in (0, 1)]
    for want, text, out in zip(expected, texts, outs):
        assert out.choices[0].finish_reason == "stop", (want, text)
        if isinstance(want, str):
            assert re.fullmatch(want, text), (want, text)
        else:
            assert text in want, (want, text)


def test_a_grammar_and_json_object(client):
    grammar = 'root ::= "The " animal " says " sound "."\nanimal ::= "cat" | "dog" | "cow"\nsound ::= [a-z]{2,5}'
    out = client.completions.create(model=MODEL, prompt="A farm:", max_tokens=30, temperature=0,
                                    extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"The (cat|dog|cow) says [a-z]{2,5}\.", out.choices[0].text), out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    obj = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=30, temperature=0,
                                         response_format={"type": "json_object"}).choices[0]
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)
    else:   # any object is unbounded: the model may ramble; what it wrote is still an object's start
        assert obj.finish_reason == "length" and obj.message.content.startswith("{")


class Pet(BaseModel):
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool


def test_the_clients_parse_helper_with_a_pydantic_model(client):
    done = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe a pet."}],
                                         response_format=Pet, max_tokens=80, temperature=0)
    pet = done.choices[0].message.parsed
    assert isinstance(pet, Pet) and done.choices[0].finish_reason == "stop"
    assert list(json.loads(done.choices[0].message.content)) == ["name", "kind", "age", "vaccinated"], \
        "the schema's property order is kept"
    beta = client.beta.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A dog."}],
                                              response_format=Pet, max_tokens=80, temperature=0.8, seed=3)
    assert isinstance(beta.choices[0].message.parsed, Pet)


def test_a_streamed_structured_output_validates(client):
    schema = schemas(1, seed=7)[0]
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100, temperature=0, stream=True,
                                            extra_body={"guided_json": schema})
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
    ({"extra_body": {"guided_grammar": "root ::= (("}}, "guided_grammar"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_choice"),
    ({"extra_body": {"structured_outputs": {"regex": "("}}}, "structured_outputs.regex")])
def test_an_invalid_constraint_is_a_400_naming_its_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **fields)
    assert err.value.body["param"] == param, err.value.body
    ok = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason == "length", "other requests are unaffected"


def test_a_grammar_that_cannot_finish_in_max_tokens_ends_with_length_and_one_that_can_stops_early(client):
    t0 = time.monotonic()
    long = client.completions.create(model=MODEL, prompt="Letters:", max_tokens=5, temperature=0,
                                      extra_body={"guided_regex": "[a-z]{200}"})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 5
    assert re.fullmatch("[a-z]+", long.choices[0].text)
    # ignore_eos: only the grammar's end can stop it (an EOS sampled there would be an ordinary token)
    short = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=50, temperature=0,
                                      extra_body={"guided_choice": ["maybe"], "ignore_eos": True})
    assert short.choices[0].text == "maybe" and short.choices[0].finish_reason == "stop"
    assert short.usage.completion_tokens < 5, "the grammar's end finishes the request, no EOS step needed"
    assert time.monotonic() - t0 < 60
