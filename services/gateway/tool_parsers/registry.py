"""The tool-call parsers by name (``--tool-call-parser``)."""

from __future__ import annotations

from neo_gateway.tool_parsers.base import ToolParser, ToolParserName
from neo_gateway.tool_parsers.hermes import HermesToolParser
from neo_gateway.tool_parsers.llama3_json import Llama3JsonToolParser

PARSERS: dict[ToolParserName, type[ToolParser]] = {ToolParserName.HERMES: HermesToolParser,
                                                   ToolParserName.LLAMA3_JSON: Llama3JsonToolParser}


def parser_for(name: str) -> ToolParser:
    return PARSERS[ToolParserName(name)]()
