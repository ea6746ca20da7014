"""A chat request's tools and tool choice: validated (400s naming the field), the tools the chat
template sees, and for ``required`` or a named function the JSON schema the output must follow
(enforced by the structured-output machinery, as vLLM does)."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

from neo_gateway.param_error import ParamError
from neo_gateway.structured_output.spec import StructuredOutputKind, StructuredOutputSpec

_ANY_OBJECT = {"type": "object", "properties": {}}


class ToolChoiceMode(str, enum.Enum):
    NONE = "none"          # no tools, or tool_choice none: plain text
    AUTO = "auto"          # the model decides; the server's tool-call parser finds the calls
    REQUIRED = "required"  # one or more calls of any of the tools (a JSON array, grammar-enforced)
    NAMED = "named"        # exactly one call of the named function (its arguments, grammar-enforced)


@dataclasses.dataclass
class ToolRequest:
    """``tools``: the request's function tools as given (the template's ``tools`` variable);
    ``mode``; ``named``: the forced function's name (NAMED only); ``parallel``: more than one call
    allowed (``parallel_tool_calls``)."""

    tools: list[dict[str, Any]]
    mode: ToolChoiceMode
    named: str | None = None
    parallel: bool = True

    @classmethod
    def from_fields(cls, tools: Any, tool_choice: Any, parallel_tool_calls: bool | None) -> "ToolRequest":
        tools = list(tools or [])
        names = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
                raise ParamError(f"tools.{i}", 'a tool is {"type": "function", "function": {"name": ...}}')
            if not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ParamError(f"tools.{i}.function.name", "a function needs a name")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise ParamError(f"tools.{i}.function.parameters", "parameters must be a JSON schema object")
            names.append(fn["name"])
        parallel = parallel_tool_calls is not False
        if tool_choice is None:
            mode = ToolChoiceMode.AUTO if tools else ToolChoiceMode.NONE   # OpenAI's default
            return cls(tools, mode, parallel=parallel)
        if isinstance(tool_choice, str):
            try:
                mode = ToolChoiceMode(tool_choice)
            except ValueError:
                mode = None
            if mode is None or mode is ToolChoiceMode.NAMED:
                raise ParamError("tool_choice", "tool_choice is none, auto, required or "
                                                '{"type": "function", "function": {"name": ...}}')
            if mode is not ToolChoiceMode.NONE and not tools:
                raise ParamError("tool_choice", f"tool_choice {tool_choice} needs tools")
            return cls(tools, mode, parallel=parallel)
        fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ParamError("tool_choice", 'a named tool choice is {"type": "function", "function": {"name": ...}}')
        if name not in names:
            raise ParamError("tool_choice", f"tool_choice names the function {name!r}, which is not among the tools")
        return cls(tools, ToolChoiceMode.NAMED, name, parallel)

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return self.tools or None

    def _parameters(self, tool: dict) -> dict:
        return tool["function"].get("parameters") or _ANY_OBJECT

    def spec(self) -> StructuredOutputSpec | None:
        """The grammar ``required`` and a named function impose (None for none and auto): the named
        function's arguments, or vLLM's array of ``{"name", "parameters"}`` calls."""
        if self.mode is ToolChoiceMode.NAMED:
            tool = next(t for t in self.tools if t["function"]["name"] == self.named)
            return StructuredOutputSpec(StructuredOutputKind.JSON, json.dumps(self._parameters(tool)), None,
                                        "tool_choice")
        if self.mode is ToolChoiceMode.REQUIRED:
            calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
                {"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                  "parameters": self._parameters(t)},
                 "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]}}
            if not self.parallel:
                calls["maxItems"] = 1
            return StructuredOutputSpec(StructuredOutputKind.JSON, json.dumps(calls), None, "tool_choice")
        return None
