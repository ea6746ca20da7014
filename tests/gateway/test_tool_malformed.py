"""Tool-call output that is not (or not yet, or not only) a call: strings JSON refuses (control
characters, invalid escapes), calls cut short, trailing commas, text after a call, calls
``required`` leaves out, keys written twice, deep nesting, lone surrogates. None of it may raise
(a 500, or a stream cut off); a stream gives what the whole response gives, except where a call
already went out before it turned out malformed: then the stream ends that call as written and
never sends its text as content too (vLLM's streaming parsers cannot take a call back either). The
scanner reads each chunk's text once: its work is bounded by the text's length."""

from __future__ import annotations

import json
import sys

import pytest
from test_tool_streaming import _Out, _accumulate, _check, _expected, _stream, _tool_output

from neo_gateway.fast_json import FastJSONResponse, sse_event
from neo_gateway.tool_parsers import ToolOutput, ToolRequest
from neo_gateway.tool_parsers.base import ToolCall
from neo_gateway.tool_parsers.partial_json import loads_first_wins, scan_object

DEEP = '{"a": ' + "[" * 1100 + "]" * 1100 + "}"   # beyond json's recursion limit (1000)


@pytest.fixture(autouse=True)
def python_recursion_limit():
    """DEEP must exceed the recursion limit: Python's default, which other tests of a whole run (or
    libraries they load) may have raised."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(before)

# streamed exactly as the whole response: the flaw shows before any delta of the call goes out
SAME = [
    ("hermes", "auto", '<tool_call>{"name": "get\nweather", "arguments": {}}</tool_call>'),   # control characters
    ("hermes", "auto", '<tool_call>{"name": "get_weather", "argu\tments": {}}</tool_call>'),
    ("hermes", "auto", '<tool_call>{"name": "get_weather", "arguments": "\\q"}</tool_call>'),   # invalid escapes
    ("hermes", "auto", '<tool_call>{"na\\me": "get_weather", "arguments": {}}</tool_call>'),
    ("llama3_json", "auto", '{"name": "f\\x", "parameters": {}}'),
    ("llama3_json", "auto", '{"name": "get_time\\u12", "parameters": {}}'),
    ("llama3_json", "auto", '{"name": "get_weather", "parameters": 5}'),
    ("hermes", "auto", '<tool_call>{"name": "get_weather", "arguments": "null"}</tool_call>'),
    ("llama3_json", "auto", '{"name": "get_weather", "parameters": "{\\"city\\": \\"Rome\\"}"}'),
    # required leaves out a call whose parameters are not an object: the next keeps index 0
    ("hermes", "required", '[{"name": "note", "parameters": "abc"}, {"name": "get_weather", "parameters": {"city": "x"}}]'),
    ("hermes", "required", '[{"name": "note", "parameters": 5}, {"name": "get_time", "parameters": {"zone": "CET"}}]'),
    ("hermes", "required", '[{"parameters": {}}, {"name": "get_time", "parameters": {"zone": "CET"}}]'),   # no name
    # a key written twice: the first value wins in the stream and in the whole response
    ("hermes", "auto", '<tool_call>{"name": "get_weather", "arguments": {"a": 1}, "name": "get_time"}</tool_call>'),
    ("hermes", "auto", '<tool_call>{"name": "ping", "arguments": {"a": 1}, "arguments": {"b": 2}}</tool_call>'),
    ("llama3_json", "auto", '{"name": "get_weather", "arguments": {"a": 1}, "parameters": {"b": 2}}'),
    # lone surrogates (a \\ud800 escape): a name and an argument
    ("hermes", "auto", '<tool_call>{"name": "get\\ud800", "arguments": {"city": "\\udfff"}}</tool_call>'),
]
# (parser, choice, text, finish reason, the stream's content, calls and finish reason written character by character)
STREAMED_THEN_REJECTED = [
    ("hermes", "auto", '<tool_call>{"name":"get_weather","arguments":{"city":"Par', "length",
     "", [("get_weather", '{"city":"Par')], "length"),
    ("hermes", "auto", 'Let me see.<tool_call>{"name":"get_weather","arguments":{"city":"Par', "length",
     "Let me see.", [("get_weather", '{"city":"Par')], "length"),
    ("llama3_json", "auto", '{"name":"get_weather","parameters":{"a":1}} and then more', "stop",
     "", [("get_weather", '{"a":1}')], "tool_calls"),
    ("hermes", "auto", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"},}</tool_call>', "stop",
     "", [("get_weather", '{"city": "Paris"}')], "tool_calls"),
    ("hermes", "required", '[{"name": "get_weather", "parameters": {"city": "Pa', "length",
     "", [("get_weather", '{"city": "Pa')], "length"),
    ("hermes", "auto", '<tool_call>{"name": "ping", "arguments": ' + DEEP + '}</tool_call>', "stop",
     "", [("ping", DEEP)], "tool_calls"),
    ("llama3_json", "auto", '{"name": "ping", "parameters": ' + DEEP + '}', "stop", "", [("ping", DEEP)], "tool_calls"),
    ("hermes", "required", '[{"name": "ping", "parameters": ' + DEEP + '}]', "stop", "", [("ping", DEEP)], "tool_calls"),
]


@pytest.mark.parametrize("parser,choice,text", SAME, ids=range(len(SAME)))
def test_the_stream_gives_the_whole_response(parser, choice, text):
    for at in range(len(text) + 1):
        _check(parser, choice, text, [text[:at], text[at:]])
    _check(parser, choice, text, list(text) + [""])


@pytest.mark.parametrize("parser,choice,text,reason,content,calls,streamed_reason", STREAMED_THEN_REJECTED,
                         ids=range(len(STREAMED_THEN_REJECTED)))
def test_a_call_streamed_before_it_turned_out_malformed(parser, choice, text, reason, content, calls,
                                                        streamed_reason):
    want_content, want_calls, want_reason = _expected(parser, choice, text, reason)
    assert (want_content, want_calls, want_reason) == (text, [], reason), "the whole response: text"
    _check(parser, choice, text, ["", text], reason)   # nothing streamed before the end: the same
    steps = _stream(parser, choice, list(text) + [""], reason)
    got, got_calls, _ = _accumulate(steps)
    assert got == content and [(c["name"], c["arguments"]) for c in got_calls] == calls
    assert steps[-1]["finish_reason"] == streamed_reason
    for at in range(0, len(text) + 1, max(1, len(text) // 50)):
        got, got_calls, _ = _accumulate(_stream(parser, choice, [text[:at], text[at:]], reason))
        assert got in ("", content, text) and (got == text) == (not got_calls), "never the call as content too"


@pytest.mark.parametrize("text", [t for _, choice, t in SAME if choice == "required"], ids=range(3))
def test_a_call_required_leaves_out_does_not_hold_the_next_one_back(text):
    steps = _stream("hermes", "required", list(text) + [""])
    first = next(k for k, s in enumerate(steps) if s["delta"].get("tool_calls"))
    assert first < len(steps) - 5 and steps[first]["delta"]["tool_calls"][0]["index"] == 0


def test_arguments_written_as_the_string_null_are_none():
    assert ToolCall.of("f", "null").arguments == "{}" and ToolCall.of("f", "null", "null").arguments == "{}"
    message, _ = _tool_output("llama3_json", "auto").message('{"name": "ping", "arguments": "null"}', "stop")
    assert message["tool_calls"][0]["function"]["arguments"] == "{}"


def test_the_scanner_and_extraction_agree_on_keys_written_twice():
    text = '{"name": "a", "arguments": {"x": 1}, "name": "b", "arguments": {"y": 2}}'
    call, obj = scan_object(text, 0, ("arguments",)), loads_first_wins(text)
    assert (call.name, json.loads(call.arguments(text))) == (obj["name"], obj["arguments"]) == ("a", {"x": 1})


def test_lone_surrogates_reach_the_client():
    message, _ = _tool_output("hermes", "auto").message(SAME[-1][2], "stop")
    assert message["tool_calls"][0]["function"]["name"] == "get\ud800"
    assert json.loads(FastJSONResponse({"message": message}).body)["message"] == message
    chunk = {"delta": {"tool_calls": [{"index": 0, "function": {"name": "get\ud800"}}]}}
    assert json.loads(sse_event(chunk)[len(b"data: "):]) == chunk


@pytest.mark.parametrize("parser,choice,text", [
    ("hermes", "auto", 'Sure.<tool_call>{"name": "note", "arguments": {"code": "' + "x = 1\\n" * 1200 + '"}}</tool_call>'),
    ("llama3_json", "auto", '{"name": "note", "parameters": {"items": [' + "[1, 2.5e3, true, null], " * 400 + "0]}}"),
    ("hermes", "required", '[{"name": "note", "parameters": {"text": "' + "a\\u00e9\\\\" * 1000 + '"}}]')],
    ids=["hermes", "llama3_json", "required"])
def test_streaming_reads_each_character_about_once(parser, choice, text):
    """Each chunk's text is read once (a resumable scanner), not the whole text again per chunk."""
    out = ToolOutput.for_request(ToolRequest.from_fields([{"type": "function", "function": {"name": "note"}}],
                                                         choice, None), parser)
    wrapped = out.wrap_chunk(lambda index, o: {"choices": [{"index": index, "delta": {}, "finish_reason": None}]})
    for k in range(0, len(text), 3):
        wrapped(0, _Out(text[k:k + 3]))
    assert len(text) > 8000 and out._scanners[0].scanned <= 2 * len(text)
