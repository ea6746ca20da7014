"""Tool calling end to end with the official ``openai`` client on a real replica of the embedded
SmolLM2-135M (default ``--tool-call-parser hermes``): ``required`` and a named function (enforced
by the structured-output grammar), ``auto`` (the parser finds the call the model wrote; a regex
makes this small model write one), plain text when no call is made, streaming deltas, the tool
result sent back through the chat template, and 400s naming the field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client(small_pool_replica):
    return openai.OpenAI(base_url=small_pool_replica.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def check_calls(message, names=None):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_return_valid_calls(client):
    required = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                              max_tokens=80, temperature=0)
    assert required.choices[0].finish_reason == "tool_calls"
    check_calls(required.choices[0].message)
    named = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0.7,
                                           seed=4, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message, {"get_weather"})
    assert len(choice.message.tool_calls) == 1


def test_auto_finds_the_call_the_model_wrote_and_plain_text_stays_text(client):
    written = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}", '
               r'"unit": "(c|f)"\}\}\n</tool_call>')
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=60,
                                         temperature=0, extra_body={"guided_regex": written})
    assert out.choices[0].finish_reason == "tool_calls"
    check_calls(out.choices[0].message, {"get_weather"})
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    assert plain.choices[0].finish_reason == "length"


def test_streamed_calls_arrive_as_deltas_with_finish_reason_tool_calls(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                max_tokens=80, temperature=0, stream=True)
        chunks = [c.choices[0] for c in stream if c.choices]
        deltas = [d for c in chunks for d in (c.delta.tool_calls or [])]
        assert chunks[-1].finish_reason == "tool_calls" and deltas
        assert not "".join(c.delta.content or "" for c in chunks)
        for d in deltas:
            assert d.id and d.function.name in SCHEMAS
            jsonschema.validate(json.loads(d.function.arguments), SCHEMAS[d.function.name])


def test_the_tool_result_goes_back_through_the_chat_template(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    second = client.chat.completions.create(model=MODEL, messages=turn, tools=TOOLS, tool_choice="none",
                                            max_tokens=12, temperature=0)
    assert second.choices[0].message.content and second.choices[0].message.tool_calls is None


@pytest.mark.parametrize("fields,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format")])
def test_bad_tool_requests_get_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **fields)
    assert err.value.body["param"] == param, err.value.body
