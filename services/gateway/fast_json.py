"""JSON for the response hot path (SSE chunks and whole responses): ``orjson`` where it can
encode the value, else exactly the standard library's encoding as before.

Per chunk, ``json.dumps`` plus the ``str`` -> ``bytes`` encode that Starlette does afterwards cost
several times what ``orjson.dumps`` (straight to UTF-8 bytes) costs; measured in
``benchmarks/gateway_hot_path.py``. orjson refuses what the standard library writes anyway: a lone
surrogate (``\\ud800`` in a tool call's JSON arguments decodes to one), integers beyond 64 bits,
non-string keys; those values take the old path, so no response changes from a 200 to a 500.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

try:
    import orjson
except ImportError:   # an install without it keeps the standard library's encoder
    orjson = None


def dumps(value: Any, separators: tuple[str, str] = (", ", ": ")) -> bytes:
    """``value`` as UTF-8 JSON: orjson's (compact) where it can encode it, else the standard
    library's (ASCII-only, with ``separators``)."""
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except TypeError:   # orjson.JSONEncodeError is a TypeError
            pass
    return json.dumps(value, separators=separators).encode()


def sse_event(value: Any) -> bytes:
    """One server-sent event carrying ``value`` as JSON."""
    return b"data: " + dumps(value) + b"\n\n"


class FastJSONResponse(JSONResponse):
    """Starlette's JSONResponse (compact, UTF-8) rendered by orjson where it can. (A NaN becomes
    ``null`` where Starlette raised; the responses carry none: logprobs are floored at -9999.)
    What orjson refuses is written ASCII-only by the standard library: Starlette's own render
    (``ensure_ascii=False``, then UTF-8) raises on a lone surrogate, which ``\\ud800`` escapes carry."""

    def render(self, content: Any) -> bytes:
        return dumps(content, separators=(",", ":"))
