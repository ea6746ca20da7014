"""Hermes / Qwen2.5 tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one
block per call, after optional plain content (vLLM's ``hermes`` parser)."""

from __future__ import annotations

import json
import re

from neo_gateway.tool_parsers.base import CallDraft, CallScanner, ExtractedToolCalls, ToolCall, ToolParser, held_prefix
from neo_gateway.tool_parsers.partial_json import ObjectScanner, PartialCall, drafts_of, loads_first_wins, scan_object

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)
_ARGS = ("arguments",)


def _block_object(text: str, at: int) -> int | None:
    """Where the call object of the block whose JSON text starts at ``text[at]`` starts; -1: the
    block is not an object; None: nothing but whitespace written yet."""
    while at < len(text) and text[at].isspace():
        at += 1
    if at >= len(text):
        return None
    return at if text[at] == "{" else -1


class HermesScanner(CallScanner):
    """The calls of a growing Hermes output, read incrementally: ``done`` (the calls finished),
    ``current`` (the open call's scanner), ``search`` (where the next ``<tool_call>`` may start),
    ``stopped`` (a block that is not a call object: no call after it counts)."""

    def __init__(self) -> None:
        self.done: list[PartialCall] = []
        self.current: ObjectScanner | None = None
        self.search, self.stopped, self._scanned = 0, False, 0

    @property
    def scanned(self) -> int:
        return self._scanned + (self.current.scanned if self.current is not None else 0)

    def drafts(self, text: str) -> list[CallDraft]:
        while not self.stopped:
            if self.current is None:
                at = text.find(START, self.search)
                if at < 0:
                    self.search = max(self.search, len(text) - len(START) + 1)
                    break
                self.search = at
                start = _block_object(text, at + len(START))
                if start is None:
                    break
                if start < 0:
                    self.stopped = True
                    break
                self.current = ObjectScanner(start, _ARGS)
            call = self.current.advance(text)
            if call.broken:
                self.stopped = True
            if call.end is None or call.broken:
                break
            self._scanned += self.current.scanned
            self.done.append(call)
            self.current, self.search = None, call.end
        return drafts_of(text, self.done + ([self.current.call] if self.current is not None else []))


class HermesToolParser(ToolParser):
    def extract(self, text: str) -> ExtractedToolCalls:
        if START not in text:
            return ExtractedToolCalls(text, [])
        calls = []
        for block in _BLOCK.finditer(text):
            group = 1 if block.group(1) is not None else 2
            try:
                obj = loads_first_wins(block.group(group).strip())
            except (json.JSONDecodeError, RecursionError):
                return ExtractedToolCalls(text, [])   # not a well-formed call: it stays text (as vLLM)
            start = _block_object(text, block.start(group))
            raw = scan_object(text, start, _ARGS).arguments(text) if start is not None and start >= 0 else None
            call = ToolCall.of(obj.get("name"), obj.get("arguments"), raw) if isinstance(obj, dict) else None
            if call is None:
                return ExtractedToolCalls(text, [])
            calls.append(call)
        content = text[:text.index(START)]   # as it was written (and streamed), as vLLM returns it
        return ExtractedToolCalls(content or None, calls)

    def content_end(self, text: str, start: int = 0) -> int:
        at = text.find(START, start)
        return at if at >= 0 else max(start, held_prefix(text, START))

    def scanner(self) -> HermesScanner:
        return HermesScanner()
