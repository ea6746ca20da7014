"""The HTTP server's connection limits: what uvicorn offers, and what it lacks, built on its protocol.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but gives a request no deadline
for its request line and headers: a client that sends them a byte at a time (slowloris) holds its
connection, and the server's memory for it, forever. Its ``limit_concurrency`` counts running
requests as well as connections and answers from inside uvicorn, where nothing is counted.
:class:`EdgeProtocol` adds a header deadline and a connection cap to uvicorn's HTTP/1.1 protocols:
httptools' C parser where it is installed (a dependency; uvicorn's choice too), else h11's. The
body's own limits are ASGI middleware (http_limits.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:   # httptools missing: h11 alone
    HttpToolsProtocol = None

from neo_common.config import HttpConfig
from neo_gateway.errors import RejectReason, error_body, error_json

Observe = Callable[[RejectReason], None]


def _raw_408(timeout_s: float) -> bytes:
    """A complete 408 answer, written as bytes: the request never became one the server could parse."""
    body = json.dumps(error_body(408, f"the request line and headers did not arrive within {timeout_s:g} s"))
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body.encode()))


def _over_connection_limit(limit: int, observe: Observe):
    """The app a connection over the cap gets instead of the real one: 503, then the connection closes."""
    async def app(scope, receive, send) -> None:
        observe(RejectReason.TOO_MANY_CONNECTIONS)
        await error_json(503, f"the server holds its maximum of {limit} connections; retry later",
                         headers={"Retry-After": "1", "Connection": "close"})(scope, receive, send)
    return app


class EdgeProtocol:
    """A mixin for uvicorn's HTTP/1.1 protocols: a header deadline and a connection cap.

    - Header deadline: armed when a connection opens, and on a kept-alive connection when the first
      byte of its next request arrives (the idle time before is the keep-alive's); disarmed when
      uvicorn has parsed the request's headers. When it fires, a client that sent part of a request
      gets 408, an idle one is simply closed.
    - Connection cap: a connection that finds ``max_connections`` others open has its request
      answered 503 (Retry-After) without reaching the app, then closed.

    Set by :func:`edge_protocol`: ``header_timeout_s``, ``max_connections``, ``observe`` (counts
    rejections in the app's metrics).
    """

    header_timeout_s: float = 10.0
    max_connections: int = 2048
    observe: Observe = staticmethod(lambda reason: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._armed_for: object = None  # the request cycle current when the deadline was armed
        self._partial = False  # bytes of the next request arrived since then

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.app = _over_connection_limit(self.max_connections, self.observe)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_deadline()  # the first bytes of the next request on this connection
        self._partial = True
        super().data_received(data)

    def _headers_parsed(self) -> None:
        if self._header_timer is not None and self.cycle is not self._armed_for:
            self._disarm()  # a new request's headers are in

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm()
        self._armed_for, self._partial = self.cycle, False
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.cycle is not self._armed_for or self.transport.is_closing():
            return
        if self._partial:
            self.observe(RejectReason.TIMEOUT)
            self.transport.write(_raw_408(self.header_timeout_s))
        self.transport.close()


class EdgeH11Protocol(EdgeProtocol, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        self._headers_parsed()


if HttpToolsProtocol is not None:
    class EdgeHttpToolsProtocol(EdgeProtocol, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._headers_parsed()

    DEFAULT_PROTOCOL: type[EdgeProtocol] = EdgeHttpToolsProtocol
else:
    DEFAULT_PROTOCOL = EdgeH11Protocol


def edge_protocol(http: HttpConfig, observe: Observe, base: type[EdgeProtocol] = DEFAULT_PROTOCOL) -> type:
    """An :class:`EdgeProtocol` class with this configuration (uvicorn builds one per connection)."""
    return type("ConfiguredEdgeProtocol", (base,), {
        "header_timeout_s": http.header_timeout_s, "max_connections": http.max_connections,
        "observe": staticmethod(observe)})


def server_options(http: HttpConfig, app) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for the HTTP limits (the app's metrics count rejections)."""
    return {"http": edge_protocol(http, app.state.metrics.observe_rejected),
            "timeout_keep_alive": http.keep_alive_s,
            "limit_concurrency": None}  # EdgeProtocol caps connections itself, and counts what it refuses
