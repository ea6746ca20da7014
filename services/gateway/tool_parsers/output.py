"""The assistant message (or its stream of deltas) that one chat request's text becomes."""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

from neo_gateway.param_error import ParamError
from neo_gateway.tool_parsers.base import CallDraft, ExtractedToolCalls, ToolCall, ToolParser
from neo_gateway.tool_parsers.partial_json import PartialCall, drafts_of, scan_sequence
from neo_gateway.tool_parsers.registry import parser_for
from neo_gateway.tool_parsers.choice import ToolChoiceMode, ToolRequest

TOOL_CALLS = "tool_calls"   # the finish reason of a choice that ends in tool calls


class ToolOutput:
    """Turns generated text into ``content`` and ``tool_calls`` for one chat request.

    - ``request``: the tools and the choice mode; ``parser``: the server's tool-call parser (auto).
    - ``_text``/``_sent``: per choice index (streaming), the text so far and how much of it went
      out as content; text that may still be a tool call is held back until the choice ends.
    - ``_calls``: per choice index, the calls streamed so far (:class:`_SentCall`): each is sent
      as vLLM streams them, its ``id``, ``type`` and ``function.name`` first, then its
      ``function.arguments`` in pieces as the model writes them.
    """

    def __init__(self, request: ToolRequest, parser: ToolParser | None) -> None:
        self.request, self.parser = request, parser
        self._text: dict[int, str] = {}
        self._sent: dict[int, int] = {}
        self._calls: dict[int, list[_SentCall]] = {}

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
                parsed = json.loads(text)
                raw = [c.arguments(text) for c in _required_calls(text)]
                raw = raw if len(raw) == len(parsed) else [None] * len(parsed)
                calls = [ToolCall.of(c.get("name"), c.get("parameters"), r) for c, r in zip(parsed, raw)]
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
        calls stream as they are written (:meth:`_call_deltas`); at the choice's end, the rest of
        the content and of the calls, as :meth:`extract` finds them in the whole text."""
        if not self.active:
            return chunk

        def wrapped(index, out):
            if out is None:
                return chunk(index, out)
            made = chunk(index, out)
            if made is None:
                return None   # no new text: nothing new to say either (and a call's first delta must go out)
            delta, reason = self._step(index, out.text, out.finished, out.finish_reason)
            for choice in made["choices"]:
                choice["delta"], choice["finish_reason"] = delta, reason
            return made
        return wrapped

    def drafts(self, text: str, finished: bool) -> list[CallDraft]:
        """The calls in ``text`` as far as written, by the mode: the named function's arguments are
        the whole text; ``required`` writes an array of calls; ``auto``: the parser's."""
        mode = self.request.mode
        if mode is ToolChoiceMode.NAMED:
            return [CallDraft(self.request.named, text)]
        if mode is ToolChoiceMode.REQUIRED:
            drafts = drafts_of(text, _required_calls(text))
        elif mode is ToolChoiceMode.AUTO and self.parser is not None:
            drafts = self.parser.drafts(text)
        else:
            drafts = []
        return drafts if self.request.parallel else drafts[:1]

    def _step(self, index: int, text: str, finished: bool, reason: str | None) -> tuple[dict, str | None]:
        whole = self._text.get(index, "") + text
        self._text[index] = whole
        sent = self._sent.get(index, 0)
        if not finished:
            end = self.parser.content_end(whole) if self.request.mode is ToolChoiceMode.AUTO and self.parser else 0
            self._sent[index] = max(sent, end)
            delta = {"content": whole[sent:end]} if end > sent else {}
            calls = self._call_deltas(index, self.drafts(whole, False))
            if calls:
                delta["tool_calls"] = calls
            return delta, None
        found = self.extract(whole)
        delta: dict = {}
        rest = (found.content or "")[sent:] if found.content is not None and found.content.startswith(whole[:sent]) \
            else ""
        if rest:
            delta["content"] = rest
        calls = self._call_deltas(index, [CallDraft(c.name, c.arguments) for c in found.calls], found.calls)
        if calls:
            delta["tool_calls"] = calls
        return delta, self.finish_reason(found, reason)

    def _call_deltas(self, index: int, drafts: list[CallDraft], final: list[ToolCall] | None = None) -> list[dict]:
        """What the client has not seen of ``drafts``: a call's first delta once its name is known
        (``id``, ``type``, ``function.name``, the arguments so far), then the arguments' growth.
        ``final``: the calls of the whole output (a call first seen there goes out with its id)."""
        sent = self._calls.setdefault(index, [])
        out = []
        for k, draft in enumerate(drafts):
            if draft.name is None:
                break   # calls go out in order: a later one waits for this one's name
            if k == len(sent):
                call_id = final[k].id if final else ToolCall(draft.name, "").id
                sent.append(_SentCall(call_id, draft.name, draft.arguments))
                out.append({"index": k, "id": call_id, "type": "function",
                            "function": {"name": draft.name, "arguments": draft.arguments}})
                continue
            done = sent[k]
            if draft.arguments.startswith(done.arguments) and len(draft.arguments) > len(done.arguments):
                out.append({"index": k, "function": {"arguments": draft.arguments[len(done.arguments):]}})
                done.arguments = draft.arguments
        return out


@dataclasses.dataclass
class _SentCall:
    """A call as a stream has sent it so far."""

    id: str
    name: str
    arguments: str


def _required_calls(text: str) -> list[PartialCall]:
    """The call objects of ``required``'s array (``[{"name": ..., "parameters": {...}}, ...]``)."""
    at = len(text) - len(text.lstrip())
    if not text.startswith("[", at):
        return []
    at += 1
    at += len(text[at:]) - len(text[at:].lstrip())
    return scan_sequence(text, at, ("parameters",), ",")
