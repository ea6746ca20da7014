"""The assistant message (or its stream of deltas) that one chat request's text becomes."""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

from neo_gateway.param_error import ParamError
from neo_gateway.tool_parsers.base import ExtractedToolCalls, ToolCall, ToolParser
from neo_gateway.tool_parsers.registry import parser_for
from neo_gateway.tool_parsers.choice import ToolChoiceMode, ToolRequest

TOOL_CALLS = "tool_calls"   # the finish reason of a choice that ends in tool calls


class ToolOutput:
    """Turns generated text into ``content`` and ``tool_calls`` for one chat request.

    - ``request``: the tools and the choice mode; ``parser``: the server's tool-call parser (auto).
    - ``_text``/``_sent``: per choice index (streaming), the text so far and how much of it went
      out as content; text that may still be a tool call is held back until the choice ends.
    """

    def __init__(self, request: ToolRequest, parser: ToolParser | None) -> None:
        self.request, self.parser = request, parser
        self._text: dict[int, str] = {}
        self._sent: dict[int, int] = {}

    @classmethod
    def for_request(cls, request: ToolRequest, parser_name: str) -> "ToolOutput":
        """``parser_name``: the server's ``--tool-call-parser`` (``none``: tool_choice auto is refused,
        as vLLM refuses it without ``--enable-auto-tool-choice``)."""
        if request.mode is ToolChoiceMode.AUTO and parser_name == "none":
            raise ParamError("tool_choice", 'tool_choice "auto" needs a tool-call parser (this server runs with '
                                            '--tool-call-parser none); use "required" or a named function')
        return cls(request, parser_for(parser_name) if parser_name != "none" else None)

    @property
    def active(self) -> bool:
        return self.request.mode is not ToolChoiceMode.NONE

    def extract(self, text: str) -> ExtractedToolCalls:
        mode = self.request.mode
        if mode is ToolChoiceMode.NAMED:
            return ExtractedToolCalls(None, [ToolCall(self.request.named, text)])
        if mode is ToolChoiceMode.REQUIRED:
            try:
                calls = [ToolCall.of(c.get("name"), c.get("parameters")) for c in json.loads(text)]
            except (json.JSONDecodeError, AttributeError, TypeError):
                return ExtractedToolCalls(text, [])   # cut short by max_tokens: what was written stays text
            return ExtractedToolCalls(None, [c for c in calls if c is not None])
        if mode is ToolChoiceMode.AUTO and self.parser is not None:
            found = self.parser.extract(text)
            if not self.request.parallel:
                found.calls = found.calls[:1]
            return found
        return ExtractedToolCalls(text, [])

    def finish_reason(self, found: ExtractedToolCalls, reason: str | None) -> str | None:
        return TOOL_CALLS if found.calls and reason == "stop" else reason

    # -- whole responses ----------------------------------------------------------------------------
    def message(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """The choice's assistant message and its finish reason (``tool_calls`` when it made calls)."""
        if not self.active:
            return {"role": "assistant", "content": text}, reason
        found = self.extract(text)
        message = {"role": "assistant", "content": found.content}
        if found.calls:
            message["tool_calls"] = [c.to_dict() for c in found.calls]
        return message, self.finish_reason(found, reason)

    def shape(self, final: dict) -> tuple[dict[int, dict], dict]:
        """The messages of a whole response's choices (index -> RequestOutput), and the choices with
        their finish reasons (``tool_calls`` where calls were made)."""
        shaped = {i: self.message(out.text, out.finish_reason) for i, out in final.items()}
        return ({i: m for i, (m, _) in shaped.items()},
                {i: dataclasses.replace(out, finish_reason=shaped[i][1]) for i, out in final.items()})

    # -- streams ----------------------------------------------------------------------------------
    def wrap_chunk(self, chunk: Callable) -> Callable:
        """``chunk(index, out)`` with tool-aware deltas: content streams while it surely is content;
        the rest is held and, at the choice's end, sent as its remaining content and tool calls."""
        if not self.active:
            return chunk

        def wrapped(index, out):
            if out is None:
                return chunk(index, out)
            delta, reason = self._step(index, out.text, out.finished, out.finish_reason)
            made = chunk(index, out)
            if made is not None:
                for choice in made["choices"]:
                    choice["delta"], choice["finish_reason"] = delta, reason
            return made
        return wrapped

    def _step(self, index: int, text: str, finished: bool, reason: str | None) -> tuple[dict, str | None]:
        whole = self._text.get(index, "") + text
        self._text[index] = whole
        sent = self._sent.get(index, 0)
        if not finished:
            end = self.parser.content_end(whole) if self.request.mode is ToolChoiceMode.AUTO and self.parser else 0
            self._sent[index] = max(sent, end)
            return ({"content": whole[sent:end]} if end > sent else {}), None
        found = self.extract(whole)
        delta: dict = {}
        rest = (found.content or "")[sent:] if found.content is not None and found.content.startswith(whole[:sent]) \
            else ""
        if rest:
            delta["content"] = rest
        if found.calls:
            delta["tool_calls"] = [{"index": k, **c.to_dict()} for k, c in enumerate(found.calls)]
        return delta, self.finish_reason(found, reason)


