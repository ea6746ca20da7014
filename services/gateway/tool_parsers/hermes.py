"""Hermes / Qwen2.5 tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one
block per call, after optional plain content (vLLM's ``hermes`` parser)."""

from __future__ import annotations

import json
import re

from neo_gateway.tool_parsers.base import CallDraft, ExtractedToolCalls, ToolCall, ToolParser, held_prefix
from neo_gateway.tool_parsers.partial_json import PartialCall, drafts_of, scan_object

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)
_ARGS = ("arguments",)


def _scan_block(text: str, at: int) -> PartialCall | None:
    """The call object of the block whose JSON text starts at ``text[at]`` (None: not an object)."""
    while at < len(text) and text[at].isspace():
        at += 1
    return scan_object(text, at, _ARGS) if at < len(text) and text[at] == "{" else None


class HermesToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        if START not in text:
            return ExtractedToolCalls(text, [])
        calls = []
        for block in _BLOCK.finditer(text):
            group = 1 if block.group(1) is not None else 2
            try:
                obj = json.loads(block.group(group).strip())
            except json.JSONDecodeError:
                return ExtractedToolCalls(text, [])   # not a well-formed call: it stays text (as vLLM)
            scanned = _scan_block(text, block.start(group))
            raw = scanned.arguments(text) if scanned is not None else None
            call = ToolCall.of(obj.get("name"), obj.get("arguments"), raw) if isinstance(obj, dict) else None
            if call is None:
                return ExtractedToolCalls(text, [])
            calls.append(call)
        content = text[:text.index(START)].strip()
        return ExtractedToolCalls(content or None, calls)

    def content_end(self, text: str) -> int:
        at = text.find(START)
        return at if at >= 0 else held_prefix(text, START)

    def drafts(self, text: str) -> list[CallDraft]:
        calls, at = [], text.find(START)
        while at >= 0:
            call = _scan_block(text, at + len(START))
            if call is None:
                break
            calls.append(call)
            if call.end is None:
                break
            at = text.find(START, call.end)
        return drafts_of(text, calls)
