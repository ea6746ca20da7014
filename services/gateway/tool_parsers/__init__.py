"""Tool calling: the request's tools and tool choice (:mod:`choice`), the parsers that find tool
calls in what a model wrote (vLLM's ``--tool-call-parser``: :mod:`hermes`, :mod:`llama3_json`),
and the assistant message or stream deltas made from them (:mod:`output`)."""

from neo_gateway.tool_parsers.base import ExtractedToolCalls, ToolCall, ToolParser, ToolParserName
from neo_gateway.tool_parsers.choice import ToolChoiceMode, ToolRequest
from neo_gateway.tool_parsers.output import ToolOutput
from neo_gateway.tool_parsers.registry import parser_for

__all__ = ["ExtractedToolCalls", "ToolCall", "ToolChoiceMode", "ToolOutput", "ToolParser", "ToolParserName",
           "ToolRequest", "parser_for"]
