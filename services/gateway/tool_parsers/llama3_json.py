"""Llama 3.x JSON tool calls: the whole output is ``{"name": ..., "parameters": {...}}`` (or
``"arguments"``), optionally after ``<|python_tag|>`` and several separated by ``;`` (vLLM's
``llama3_json`` parser). Output that does not start with a JSON object is plain content."""

from __future__ import annotations

import json
import re

from neo_gateway.tool_parsers.base import ExtractedToolCalls, ToolCall, ToolParser
from neo_gateway.tool_parsers.call_sequence import SequenceCallScanner
from neo_gateway.tool_parsers.partial_json import loads_first_wins

PYTHON_TAG = "<|python_tag|>"
_ARGS = ("parameters", "arguments")
_SPACE = re.compile(r"\s*")


def _calls_start(text: str) -> int | None:
    """Where the first call object may start (after whitespace and the tag); None while the text
    is whitespace or a part of the tag."""
    at = _SPACE.match(text).end()
    if text.startswith(PYTHON_TAG, at):
        at = _SPACE.match(text, at + len(PYTHON_TAG)).end()
    elif PYTHON_TAG.startswith(text[at:]):
        return None
    return at if at < len(text) else None


class Llama3Scanner(SequenceCallScanner):
    """The calls of a growing Llama 3 output, read incrementally."""

    args_keys, separators = _ARGS, ";"

    def start(self, text: str) -> int | None:
        return _calls_start(text)


class Llama3JsonToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        scanned = Llama3Scanner().calls(text)
        if not scanned:
            return ExtractedToolCalls(text, [])
        last = scanned[-1]
        if last.end is None or last.broken or text[last.end:].strip(" \t\r\n;"):
            return ExtractedToolCalls(text, [])   # cut short, or more than calls: it stays text
        calls = []
        for part in scanned:
            try:
                obj = loads_first_wins(text[part.start:part.end])
            except (json.JSONDecodeError, RecursionError):
                return ExtractedToolCalls(text, [])
            # the first of the two keys written (the one a stream sent)
            args = next((v for k, v in obj.items() if k in _ARGS), None) if isinstance(obj, dict) else None
            call = ToolCall.of(obj.get("name"), args, part.arguments(text)) if isinstance(obj, dict) else None
            if call is None:
                return ExtractedToolCalls(text, [])
            calls.append(call)
        return ExtractedToolCalls(None, calls)

    def content_end(self, text: str, start: int = 0) -> int:
        if start > 0:
            return len(text)   # it began as content: all of it is
        at = _SPACE.match(text).end()
        head = text[at:at + len(PYTHON_TAG)]
        if not head or head.startswith("{") or PYTHON_TAG.startswith(head):
            return 0   # a call would be the whole output: nothing is surely content yet
        return len(text)

    def scanner(self) -> Llama3Scanner:
        return Llama3Scanner()
