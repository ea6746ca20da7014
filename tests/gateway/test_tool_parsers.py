"""Tool calling on the gateway: the Hermes/Qwen2.5 and Llama 3.x JSON parsers on outputs recorded
from such models, what a stream may send before the end, the tool-choice validation and the
grammar of ``required`` / a named function, and the message and deltas a choice becomes."""

from __future__ import annotations

import json

import jsonschema
import pytest

from neo_gateway.param_error import ParamError
from neo_gateway.tool_parsers import ToolChoiceMode, ToolOutput, ToolRequest, parser_for
from neo_gateway.tool_parsers.hermes import HermesToolParser
from neo_gateway.tool_parsers.llama3_json import Llama3JsonToolParser

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                                                "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
NO_PARAMS = {"type": "function", "function": {"name": "ping"}}

# outputs as Hermes-2-Pro / Qwen2.5-Instruct write them (Qwen2.5's chat template asks for this format)
HERMES_ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
HERMES_TWO = ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
HERMES_UNCLOSED = '<tool_call>\n{"name": "ping", "arguments": {}}'   # stopped on </tool_call> as a stop string
# outputs as Llama-3.1/3.2-Instruct write them with JSON-based tool calling
LLAMA_ONE = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'
LLAMA_TAGGED = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}'
LLAMA_TWO = '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {"zone": "CET"}}'
LLAMA_STRING_ARGS = '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'


def calls(found):
    return [(c.name, json.loads(c.arguments)) for c in found.calls]


@pytest.mark.parametrize("text,content,expected", [
    (HERMES_ONE, None, [("get_weather", {"city": "Paris", "unit": "c"})]),
    (HERMES_TWO, "I will check both.\n", [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]),
    (HERMES_UNCLOSED, None, [("ping", {})]),
    ("The weather is fine.", "The weather is fine.", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', None, None),   # malformed
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', None, None)])                              # no name
def test_hermes_outputs(text, content, expected):
    found = HermesToolParser().extract(text)
    if expected is None:   # not a call: the text stays content, as vLLM's parser does
        assert found.content == text and not found.calls
        return
    assert found.content == content and calls(found) == expected
    assert all(c.id.startswith("chatcmpl-tool-") for c in found.calls) and len({c.id for c in found.calls}) == len(found.calls)


@pytest.mark.parametrize("text,expected", [
    (LLAMA_ONE, [("get_weather", {"city": "Paris", "unit": "c"})]),
    (LLAMA_TAGGED, [("get_time", {"zone": "UTC"})]),
    ("  " + LLAMA_TWO + "\n", [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]),
    (LLAMA_STRING_ARGS, [("get_weather", {"city": "Rome"})]),
    ("It is sunny in Paris.", None), ('{"city": "Paris"}', None), ('{"name": "get_weather", "parameters": {', None)])
def test_llama3_json_outputs(text, expected):
    found = Llama3JsonToolParser().extract(text)
    if expected is None:
        assert found.content == text and not found.calls
    else:
        assert found.content is None and calls(found) == expected


def test_what_a_stream_may_send_before_the_end():
    hermes, llama = HermesToolParser(), Llama3JsonToolParser()
    assert hermes.content_end("Let me look.") == len("Let me look.")
    assert hermes.content_end("Let me look. <tool") == len("Let me look. "), "a marker's start is held"
    assert hermes.content_end("Hi <tool_call>\n{") == 3
    assert hermes.content_end("a < b") == 5
    assert llama.content_end("  {\"na") == 0 and llama.content_end("<|python") == 0 and llama.content_end("") == 0
    assert llama.content_end("Sunny.") == 6
    assert parser_for("hermes").__class__ is HermesToolParser and parser_for("llama3_json").__class__ is Llama3JsonToolParser


@pytest.mark.parametrize("tools,choice,param", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"), ([], "required", "tool_choice"),
    ([WEATHER], {"type": "function"}, "tool_choice"), ([{"type": "code_interpreter"}], None, "tools.0"),
    ([{"type": "function", "function": {"description": "x"}}], None, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools.0.function.parameters")])
def test_bad_tools_and_choices_name_the_field(tools, choice, param):
    with pytest.raises(ParamError) as err:
        ToolRequest.from_fields(tools, choice, None)
    assert err.value.param == param


def test_modes_and_defaults():
    assert ToolRequest.from_fields(None, None, None).mode is ToolChoiceMode.NONE
    assert ToolRequest.from_fields([WEATHER], None, None).mode is ToolChoiceMode.AUTO   # OpenAI's default
    assert ToolRequest.from_fields([WEATHER], "none", None).spec() is None
    named = ToolRequest.from_fields([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None)
    assert named.mode is ToolChoiceMode.NAMED and json.loads(named.spec().text) == TIME["function"]["parameters"]
    with pytest.raises(ParamError) as err:
        ToolOutput.for_request(ToolRequest.from_fields([WEATHER], "auto", None), "none")
    assert err.value.param == "tool_choice"


def test_the_required_grammar_admits_calls_of_the_tools_only():
    schema = json.loads(ToolRequest.from_fields([WEATHER, TIME, NO_PARAMS], "required", None).spec().text)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}},
                         {"name": "ping", "parameters": {}}], schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"zone": 1}}], [{"name": "other", "parameters": {}}],
                [{"name": "get_time", "parameters": {"zone": "x"}, "extra": 1}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = json.loads(ToolRequest.from_fields([WEATHER], "required", False).spec().text)
    assert single["maxItems"] == 1, "parallel_tool_calls false: one call"


def test_messages_and_finish_reasons():
    auto = ToolOutput.for_request(ToolRequest.from_fields([WEATHER, TIME], "auto", None), "hermes")
    message, reason = auto.message(HERMES_TWO, "stop")
    assert reason == "tool_calls" and message["content"] == "I will check both.\n"   # as streamed, as vLLM
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    assert auto.message("Plain words.", "stop") == ({"role": "assistant", "content": "Plain words."}, "stop")
    assert auto.message(HERMES_ONE, "length")[1] == "length"
    one = ToolOutput.for_request(ToolRequest.from_fields([WEATHER, TIME], "auto", False), "hermes")
    assert len(one.message(HERMES_TWO, "stop")[0]["tool_calls"]) == 1
    named = ToolOutput.for_request(
        ToolRequest.from_fields([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None), "none")
    message, reason = named.message('{"city":"Rome"}', "stop")
    assert reason == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Rome"}'}
    required = ToolOutput.for_request(ToolRequest.from_fields([WEATHER, TIME], "required", None), "llama3_json")
    message, reason = required.message('[{"name": "get_time", "parameters": {"zone": "UTC"}}]', "stop")
    assert reason == "tool_calls" and json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"zone": "UTC"}
    assert required.message('[{"name": "get_ti', "length") == ({"role": "assistant", "content": '[{"name": "get_ti'},
                                                                "length")


class _Out:
    def __init__(self, text, finished=False, finish_reason=None):
        self.text, self.finished, self.finish_reason = text, finished, finish_reason


def _stream(tool_out, pieces):
    def chunk(index, out):
        return {"choices": [{"index": index, "delta": {"content": out.text}, "finish_reason": out.finish_reason}]}
    wrapped = tool_out.wrap_chunk(chunk)
    outs = [_Out(p) for p in pieces[:-1]] + [_Out(pieces[-1], True, "stop")]
    return [wrapped(0, o)["choices"][0] for o in outs]


def test_a_stream_sends_content_as_it_comes_and_the_calls_as_they_are_written():
    auto = ToolOutput.for_request(ToolRequest.from_fields([WEATHER, TIME], "auto", None), "hermes")
    head = 'I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {'
    pieces = ["I will ", "check both.\n<tool", head[len("I will check both.\n<tool"):], HERMES_TWO[len(head):]]
    assert "".join(pieces) == HERMES_TWO
    steps = _stream(auto, pieces)
    sent = "".join(s["delta"].get("content", "") for s in steps)
    assert steps[0]["delta"] == {"content": "I will "} and steps[1]["delta"] == {"content": "check both.\n"}
    assert sent == "I will check both.\n"
    named = steps[2]["delta"]["tool_calls"]   # the name is complete, its arguments begun as an object
    assert [(t["index"], t["type"], t["function"]) for t in named] == [(0, "function", {"name": "get_weather",
                                                                                        "arguments": "{"})]
    rest = steps[3]["delta"]["tool_calls"]
    assert rest[0] == {"index": 0, "function": {"arguments": '"city": "Oslo"}'}}
    assert (rest[1]["index"], rest[1]["function"]["name"]) == (1, "get_time") and rest[1]["id"] != named[0]["id"]
    assert steps[3]["finish_reason"] == "tool_calls"
    plain = _stream(ToolOutput.for_request(ToolRequest.from_fields([WEATHER], "auto", None), "llama3_json"),
                    ["Sunny ", "and warm."])
    assert [s["delta"] for s in plain] == [{"content": "Sunny "}, {"content": "and warm."}]
    assert plain[-1]["finish_reason"] == "stop"
    off = ToolOutput.for_request(ToolRequest.from_fields(None, None, None), "hermes")
    assert [s["delta"] for s in _stream(off, ["<tool_call>", "x"])] == [{"content": "<tool_call>"}, {"content": "x"}]
