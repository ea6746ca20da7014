"""Streamed tool calls on recorded outputs of both formats (and of ``required`` / a named
function), split at every position and streamed character by character: the client's
accumulation of the deltas (as the ``openai`` client does it, by ``index``) gives exactly the
non-streamed message's calls and content; each call's first delta carries ``id``, ``type`` and the
name; the arguments arrive in pieces as they are written, not at the end."""

from __future__ import annotations

import json

import pytest

from neo_gateway.tool_parsers import ToolOutput, ToolRequest
from neo_gateway.tool_parsers.partial_json import scan_object

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
PING = {"type": "function", "function": {"name": "ping"}}
NOTE = {"type": "function", "function": {"name": "note", "parameters": {"type": "string"}}}   # not an object
TOOLS = [WEATHER, TIME, PING, NOTE]

HERMES = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
    ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo, \\"NO\\" {x}"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'),
    '<tool_call>\n{"name": "ping", "arguments": {}}',
    '<tool_call>{"arguments": {"city": "Zürich 日本"}, "name": "get_weather"}</tool_call>',   # the name last
    '<tool_call>\n{"name": "ping"}\n</tool_call>',
    'Just text, no call at all.',
]
LLAMA = [
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
    '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}',
    ' {"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {"zone": "CET"}}\n',
    '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}',
    '{"name": "get_time", "parameters": {"zone": [1, {"a": "]"}], "n": -1.5e3, "t": true}}',
]
REQUIRED = ['[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "f"}}, '
            '{"name": "ping", "parameters": {}}]',
            '[ {"name": "get_time", "parameters": {"zone": "UTC"}} ]']
NAMED = ['{"city": "Lima", "unit": "c"}']
# the arguments go out in one piece: written before the name, or as a JSON string (decoded once whole)
ONE_PIECE = {HERMES[3], LLAMA[3]}
NAMED_CHOICE = {"type": "function", "function": {"name": "get_weather"}}

CASES = ([("hermes", "auto", t) for t in HERMES] + [("llama3_json", "auto", t) for t in LLAMA]
         + [("hermes", "required", t) for t in REQUIRED] + [("none", NAMED_CHOICE, t) for t in NAMED])


class _Out:
    def __init__(self, text, finished=False, finish_reason=None):
        self.text, self.finished, self.finish_reason = text, finished, finish_reason


def _tool_output(parser, choice):
    return ToolOutput.for_request(ToolRequest.from_fields(TOOLS, choice, None), parser)


def _stream(parser, choice, pieces, reason="stop"):
    """Every chunk's delta and finish reason for ``pieces`` of generated text (the last ends it
    with ``reason``)."""
    def chunk(index, out):
        if not (out.text or out.finished):
            return None
        return {"choices": [{"index": index, "delta": {"content": out.text}, "finish_reason": out.finish_reason}]}
    wrapped = _tool_output(parser, choice).wrap_chunk(chunk)
    outs = [_Out(p) for p in pieces[:-1]] + [_Out(pieces[-1], True, reason)]
    made = [wrapped(0, o) for o in outs]
    return [m["choices"][0] for m in made if m is not None]


def _accumulate(steps):
    """What the openai client's stream accumulation makes of the deltas: calls by ``index``, the
    first delta of each naming it, later ones adding to its arguments."""
    content, calls, first_args = "", {}, {}
    for step in steps:
        content += step["delta"].get("content", "")
        for d in step["delta"].get("tool_calls", []):
            k = d["index"]
            if k not in calls:
                assert d["id"] and d["type"] == "function" and d["function"]["name"], d
                calls[k] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
                first_args[k] = d["function"].get("arguments", "")
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
            calls[k]["arguments"] += d["function"].get("arguments", "")
    return content, [calls[k] for k in sorted(calls)], first_args


def _expected(parser, choice, text, reason="stop"):
    message, reason = _tool_output(parser, choice).message(text, reason)
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in message.get("tool_calls", [])]
    return message["content"], calls, reason


def _check(parser, choice, text, pieces, reason="stop"):
    steps = _stream(parser, choice, pieces, reason)
    content, calls, _ = _accumulate(steps)
    want_content, want_calls, want_reason = _expected(parser, choice, text, reason)
    assert [{"name": c["name"], "arguments": c["arguments"]} for c in calls] == want_calls, pieces
    assert content == (want_content or ""), pieces
    assert steps[-1]["finish_reason"] == want_reason
    return steps


@pytest.mark.parametrize("parser,choice,text", CASES)
def test_every_split_gives_the_non_streamed_calls(parser, choice, text):
    for at in range(len(text) + 1):
        _check(parser, choice, text, [text[:at], text[at:]])


@pytest.mark.parametrize("parser,choice,text", CASES)
def test_arguments_stream_as_they_are_written(parser, choice, text):
    steps = _check(parser, choice, text, list(text) + [""])
    _, calls, first_args = _accumulate(steps)
    for k, call in enumerate(calls):
        pieces = [d["function"]["arguments"] for s in steps for d in s["delta"].get("tool_calls", [])
                  if d["index"] == k and d["function"].get("arguments")]
        if text in ONE_PIECE:
            assert len(pieces) == 1
        elif len(call["arguments"]) > 4:
            # the name goes out once the arguments are known to be an object: with their first character
            assert first_args[k] == ("{" if choice != NAMED_CHOICE else text[0]), "the name goes out first"
            assert len(pieces) == len(call["arguments"]), "one piece per character written"


def test_ids_stay_the_same_from_first_delta_to_last():
    steps = _stream("hermes", "auto", list(HERMES[1]) + [""])
    ids = [d["id"] for s in steps for d in s["delta"].get("tool_calls", []) if "id" in d]
    assert len(ids) == 2 and len(set(ids)) == 2


def test_scanner_spans():
    text = '{"name": "f", "arguments": {"a": "}\\"", "b": [1, {"c": 2}]}, "x": 1}'
    call = scan_object(text, 0, ("arguments",))
    assert call.name == "f" and call.end == len(text)
    assert json.loads(call.arguments(text)) == {"a": '}"', "b": [1, {"c": 2}]}
    for at in range(1, len(text)):
        part = scan_object(text[:at], 0, ("arguments",))
        assert part.end is None and not part.broken
        assert call.arguments(text).startswith(part.arguments(text[:at]))
