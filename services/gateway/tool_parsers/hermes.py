"""Hermes / Qwen2.5 tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one
block per call, after optional plain content (vLLM's ``hermes`` parser)."""

from __future__ import annotations

import json
import re

from neo_gateway.tool_parsers.base import ExtractedToolCalls, ToolCall, ToolParser, held_prefix

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


class HermesToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        if START not in text:
            return ExtractedToolCalls(text, [])
        calls = []
        for closed, open_ in _BLOCK.findall(text):
            try:
                obj = json.loads((closed or open_).strip())
            except json.JSONDecodeError:
                return ExtractedToolCalls(text, [])   # not a well-formed call: it stays text (as vLLM)
            call = ToolCall.of(obj.get("name"), obj.get("arguments")) if isinstance(obj, dict) else None
            if call is None:
                return ExtractedToolCalls(text, [])
            calls.append(call)
        content = text[:text.index(START)].strip()
        return ExtractedToolCalls(content or None, calls)

    def content_end(self, text: str) -> int:
        at = text.find(START)
        return at if at >= 0 else held_prefix(text, START)
