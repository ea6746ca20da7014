"""vLLM's structural tags end to end (official ``openai`` client, the embedded SmolLM2-135M): free
text until the model writes a trigger, then the structure's ``begin``, JSON of its schema and its
``end``, in each form vLLM accepts (``response_format`` ``structural_tag`` on both endpoints, the
chat ``structural_tag`` field, ``structured_outputs.structural_tag``); malformed tags a 400 naming
the field. The trigger here is ".", which a model writes at the end of its first sentence."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from support.clients import openai_client

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 3}
TAG = {"structures": [{"begin": ". <list>", "schema": SCHEMA, "end": "</list>"}], "triggers": ["."]}
ASK = [{"role": "user", "content": "Tell me about Paris."}]


@pytest.fixture(scope="module")
def client(small_pool_replica):
    return openai_client(small_pool_replica.url, timeout=120)


def _check(text: str) -> None:
    """The first "." starts the structure: ' <list>', a JSON array of the schema, '</list>'."""
    at = text.find(".")
    assert at >= 0, f"the model wrote no trigger: {text!r}"
    m = re.match(r"\. <list>(.*?)</list>", text[at:], re.DOTALL)
    assert m, f"after the trigger the structure follows: {text!r}"
    jsonschema.validate(json.loads(m.group(1)), SCHEMA)


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "structural_tag", **TAG}},
    {"structural_tag": json.dumps(TAG)},
    {"structured_outputs": {"structural_tag": json.dumps(TAG)}}], ids=["response_format", "field", "structured_outputs"])
def test_chat_output_follows_the_tag(client, extra):
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, temperature=0, extra_body=extra)
    _check(out.choices[0].message.content)


def test_completions_output_follows_the_tag(client):
    out = client.completions.create(model=MODEL, prompt="Paris is the capital of France", max_tokens=40,
                                    temperature=0, extra_body={"response_format": {"type": "structural_tag", **TAG}})
    _check(out.choices[0].text)


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "structural_tag", "triggers": ["<x"], "structures": TAG["structures"]}},
     "response_format"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "triggered_tags"}}}, "response_format"),
    ({"structural_tag": "{not json"}, "structural_tag"),
    ({"structured_outputs": {"structural_tag": json.dumps({"triggers": ["."]})}}, "structured_outputs.structural_tag")])
def test_malformed_tags_get_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=extra)
    assert err.value.body["param"] == param, err.value.body
