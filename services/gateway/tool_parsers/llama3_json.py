"""Llama 3.x JSON tool calls: the whole output is ``{"name": ..., "parameters": {...}}`` (or
``"arguments"``), optionally after ``<|python_tag|>`` and several separated by ``;`` (vLLM's
``llama3_json`` parser). Output that does not start with a JSON object is plain content."""

from __future__ import annotations

import json

from neo_gateway.tool_parsers.base import ExtractedToolCalls, ToolCall, ToolParser

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].lstrip()
        if not body.startswith("{"):
            return ExtractedToolCalls(text, [])
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return ExtractedToolCalls(text, [])
            args = obj.get("parameters", obj.get("arguments")) if isinstance(obj, dict) else None
            call = ToolCall.of(obj.get("name"), args) if isinstance(obj, dict) else None
            if call is None:
                return ExtractedToolCalls(text, [])
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \t\r\n;":
                at += 1
        return ExtractedToolCalls(None, calls)

    def content_end(self, text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith("{") or head.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(head):
            return 0   # a call would be the whole output: nothing is surely content yet
        return len(text)
