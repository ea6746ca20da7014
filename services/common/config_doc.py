"""The configuration reference as a Markdown table, generated from the config dataclasses.

README.md embeds this table between markers; a test keeps the two identical.
"""

from __future__ import annotations

import dataclasses

from neo_common.config import SECTIONS
from neo_common.settings import Settings

BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"


def markdown_table() -> str:
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for section in SECTIONS:
        for f in dataclasses.fields(section):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            choices = f.metadata.get("choices")
            meaning = f.metadata["help"] + (f" ({' / '.join(choices)})" if choices else "")
            rows.append(f"| `{Settings.flag(f.name)}` | `{Settings.env_name(f.name)}` | `{default!r}` | {meaning} |")
    return "\n".join(rows)
