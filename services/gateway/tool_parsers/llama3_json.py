"""Llama 3.x JSON tool calls: the whole output is ``{"name": ..., "parameters": {...}}`` (or
``"arguments"``), optionally after ``<|python_tag|>`` and several separated by ``;`` (vLLM's
``llama3_json`` parser). Output that does not start with a JSON object is plain content."""

from __future__ import annotations

import json

from neo_gateway.tool_parsers.base import CallDraft, ExtractedToolCalls, ToolCall, ToolParser
from neo_gateway.tool_parsers.partial_json import PartialCall, drafts_of, scan_sequence

PYTHON_TAG = "<|python_tag|>"
_ARGS = ("parameters", "arguments")


def _calls(text: str) -> list[PartialCall]:
    """The call objects of ``text`` as far as written (none unless it starts with one)."""
    at = len(text) - len(text.lstrip())
    if text.startswith(PYTHON_TAG, at):
        at += len(PYTHON_TAG)
        at += len(text[at:]) - len(text[at:].lstrip())
    return scan_sequence(text, at, _ARGS, ";")


class Llama3JsonToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        scanned = _calls(text)
        if not scanned:
            return ExtractedToolCalls(text, [])
        last = scanned[-1]
        if last.end is None or last.broken or text[last.end:].strip(" \t\r\n;"):
            return ExtractedToolCalls(text, [])   # cut short, or more than calls: it stays text
        calls = []
        for part in scanned:
            try:
                obj = json.loads(text[part.start:part.end])
            except json.JSONDecodeError:
                return ExtractedToolCalls(text, [])
            args = obj.get("parameters", obj.get("arguments")) if isinstance(obj, dict) else None
            call = ToolCall.of(obj.get("name"), args, part.arguments(text)) if isinstance(obj, dict) else None
            if call is None:
                return ExtractedToolCalls(text, [])
            calls.append(call)
        return ExtractedToolCalls(None, calls)

    def content_end(self, text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith("{") or head.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(head):
            return 0   # a call would be the whole output: nothing is surely content yet
        return len(text)

    def drafts(self, text: str) -> list[CallDraft]:
        return drafts_of(text, _calls(text))
