"""The control plane's event loop: uvloop where it is installed (a dependency off Windows), else
asyncio's own. The API server and the engine core both run on it (docs/design.md, "The engine core")."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Coroutine

try:
    import uvloop
except ImportError:   # not installed (Windows, or a trimmed environment): asyncio's loop
    uvloop = None


def loop_name() -> str:
    return "uvloop" if uvloop is not None else "asyncio"


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run(main)`` on uvloop when available."""
    if uvloop is None or sys.version_info < (3, 11):
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
