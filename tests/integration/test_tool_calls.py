"""Tool calling end to end with the official ``openai`` client on a real replica of the embedded
SmolLM2-135M (default ``--tool-call-parser hermes``): ``required`` and a named function (enforced
by the structured-output grammar), ``auto`` (the parser finds the call the model wrote; a regex
makes this small model write one), plain text when no call is made, streaming deltas, the tool
result sent back through the chat template, and 400s naming the field.

Streamed calls as vLLM streams them: each call's first delta carries its ``id``, ``type`` and
``function.name``, then ``function.arguments`` arrives in pieces as the model writes it, and the
client's accumulation (its stream helper's ``ChatCompletionStreamState``) equals the non-streamed
response's calls exactly: ``required``, a named function, and ``auto`` with both parsers (a regex
makes the model write the call in the parser's format)."""

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
        calls = {}   # accumulated by index: the first delta names the call, the rest add to its arguments
        for d in deltas:
            if d.index not in calls:
                assert d.id and d.function.name in SCHEMAS
                calls[d.index] = [d.function.name, ""]
            calls[d.index][1] += d.function.arguments or ""
        for name, arguments in calls.values():
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])


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


# -- streamed calls, piece by piece ------------------------------------------------------------------
HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}", '
               r'"unit": "(c|f)"\}\}\n</tool_call>')
LLAMA_CALL = r'\{"name": "get_weather", "parameters": \{"city": "[A-Z][a-z]{2,8}", "unit": "(c|f)"\}\}'


def _client(replica):
    return openai.OpenAI(base_url=replica.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _calls(message):
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def _compare_streamed_with_whole(client, **request):
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
                                           **request)
    assert whole.choices[0].finish_reason == "tool_calls", whole
    chunks, pieces = [], {}
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
                                        **request) as stream:
        for event in stream:
            if event.type == "chunk":
                chunks.append(event.chunk)
            elif event.type == "tool_calls.function.arguments.delta":
                pieces.setdefault(event.index, []).append(event.arguments_delta)
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert _calls(final.choices[0].message) == _calls(whole.choices[0].message)
    deltas = [d for c in chunks for ch in c.choices for d in (ch.delta.tool_calls or [])]
    for index, (name, arguments) in enumerate(_calls(whole.choices[0].message)):
        own = [d for d in deltas if d.index == index]
        assert own[0].id and own[0].type == "function" and own[0].function.name == name
        assert all(d.id is None and d.function.name is None for d in own[1:]), "the name goes out once, first"
        assert len([p for p in pieces[index] if p]) >= 5, f"arguments in pieces as written: {pieces[index]}"
        assert "".join(d.function.arguments or "" for d in own) == arguments
        json.loads(arguments)
    assert not "".join(ch.delta.content or "" for c in chunks for ch in c.choices)


@pytest.mark.parametrize("request_fields", [
    {"tool_choice": "required"},
    {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
    {"tool_choice": "auto", "extra_body": {"guided_regex": HERMES_CALL}}], ids=["required", "named", "auto-hermes"])
def test_streamed_calls_accumulate_to_the_whole_response(small_pool_replica, request_fields):
    _compare_streamed_with_whole(_client(small_pool_replica), **request_fields)


def test_llama3_json_parser_streams_its_calls(replica_factory):
    replica = replica_factory("--tool-call-parser", "llama3_json", "--num-gpu-blocks", "48", "--max-model-len", "512")
    _compare_streamed_with_whole(_client(replica), tool_choice="auto", extra_body={"guided_regex": LLAMA_CALL})
