"""ASGI layers in front of the routes: the request body's size and time limits, and the count of
rejected requests.

The HTTP server hands the body over in pieces as they arrive; the limits are checked on those
pieces, so a body over the limit is refused once the limit is passed, whatever its framing
(``Content-Length`` or ``Transfer-Encoding: chunked``), and the rest of it is never read.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from neo_gateway.errors import RejectReason, error_json, reject_reason

# Answers given before the body was read whole end the connection: the server would otherwise
# have to read (and discard) the rest of the body to find the next request.
_CLOSE = {"Connection": "close"}


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return None


class BodyGuard:
    """Reads each request's body, within ``limit`` bytes and ``timeout_s`` seconds, before the app
    sees it: 413 as soon as more than ``limit`` bytes arrived (or a larger ``Content-Length`` is
    declared), 408 when the whole body has not arrived in time. The app then gets the body as one
    message, which is what it would have buffered itself; later ``receive`` calls (a disconnect)
    go to the server as before."""

    def __init__(self, app, limit: int, timeout_s: float) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is None and _header(scope, b"transfer-encoding") is None:
            await self.app(scope, receive, send)  # HTTP/1.1: no body at all
            return
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._too_large(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send)
            return
        except asyncio.TimeoutError:
            await error_json(408, f"the request body did not arrive within {self.timeout_s:g} s", "body",
                             headers=_CLOSE)(scope, receive, send)
            return
        except _ClientGone:
            return
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_replayed, send)

    async def _read(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope, receive, send) -> None:
        await error_json(413, f"request body exceeds {self.limit} bytes (--max-request-bytes)", "body",
                         headers=_CLOSE)(scope, receive, send)


# A probe's 503 reports the replica's state; it refuses no request.
_PROBES = ("/health", "/ready")


class RejectionCounter:
    """Counts every answer that refuses a request (4xx but a client's own hang-up, 503) by its
    reason, whichever layer gave it: authentication, the body limits, validation, admission."""

    def __init__(self, app, observe: Callable[[RejectReason], None]) -> None:
        self.app, self.observe = app, observe

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in _PROBES:
            await self.app(scope, receive, send)
            return

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                reason = reject_reason(message["status"])
                if reason is not None:
                    self.observe(reason)
            await send(message)

        await self.app(scope, receive, send_counted)
