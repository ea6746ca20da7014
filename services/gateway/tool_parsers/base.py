"""What a tool-call parser finds, and the registry of parsers by their flag value."""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from typing import Any


class ToolParserName(str, enum.Enum):
    HERMES = "hermes"            # Hermes / Qwen2.5: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    LLAMA3_JSON = "llama3_json"  # Llama 3.x: [<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]


@dataclasses.dataclass
class ToolCall:
    """One function call as the API returns it: ``arguments`` is a JSON text."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    @classmethod
    def of(cls, name: Any, arguments: Any, text: str | None = None) -> "ToolCall | None":
        """From a parsed call: None when it is not one (no string name, arguments not an object).
        ``text``: the arguments' JSON text as the model wrote it (what a stream sends piece by
        piece, :meth:`PartialCall.arguments`); without it, the arguments re-encoded."""
        if not isinstance(name, str) or not name:
            return None
        if isinstance(arguments, str):   # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except (json.JSONDecodeError, RecursionError):
                return None
        if arguments is None:   # null, or the string "null": no arguments
            arguments, text = {}, "{}"
        if not isinstance(arguments, dict):
            return None
        return cls(name, text if text is not None else json.dumps(arguments, ensure_ascii=False))


@dataclasses.dataclass
class CallDraft:
    """A call while it is being written: ``name`` once known, ``arguments``: its JSON text so far."""

    name: str | None
    arguments: str


@dataclasses.dataclass
class ExtractedToolCalls:
    """``content``: the text that is not a tool call (None when there is none); ``calls`` in order."""

    content: str | None
    calls: list[ToolCall]


class CallScanner:
    """The calls of one growing output as far as written: :meth:`drafts` is called with the whole
    text so far (each time longer) and reads only what was written since; ``scanned``: the
    characters it has read in all."""

    scanned: int

    def drafts(self, text: str) -> list[CallDraft]:
        raise NotImplementedError


class ToolParser:
    """Finds tool calls in a model's whole output (:meth:`extract`) and, while it streams, how much
    of it is surely plain content (:meth:`content_end`: text from there on may still turn out to
    be a tool call, so it is held back) and the calls as far as written (a :meth:`scanner` per
    output, whose drafts' arguments grow to the text :meth:`extract` returns for a valid call)."""

    def extract(self, text: str) -> ExtractedToolCalls:
        raise NotImplementedError

    def content_end(self, text: str, start: int = 0) -> int:
        """``start``: how much of ``text`` already went out as content (no call starts before it)."""
        raise NotImplementedError

    def scanner(self) -> CallScanner:
        raise NotImplementedError

    def drafts(self, text: str) -> list[CallDraft]:
        """The calls in ``text`` as far as written, scanned at once."""
        return self.scanner().drafts(text)


def held_prefix(text: str, marker: str) -> int:
    """Where a trailing partial ``marker`` starts in ``text`` (len(text) when there is none)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return len(text) - k
    return len(text)
