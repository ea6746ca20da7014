"""The header deadline and the connection cap hold on both of uvicorn's HTTP/1.1 parsers: httptools
(the default, where installed) and h11 (the fallback). A real uvicorn server on a real socket."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvicorn

from neo_common.config import HttpConfig
from neo_gateway import http_protocol
from neo_gateway.http_protocol import EdgeH11Protocol, edge_protocol

BASES = [EdgeH11Protocol] + ([http_protocol.EdgeHttpToolsProtocol]
                             if http_protocol.HttpToolsProtocol is not None else [])


async def _ok(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/slow":   # longer than the header deadline: the deadline must be off by now
        await asyncio.sleep(1.0)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _with_server(base, scenario, **limits) -> None:
    rejected: list = []
    port = _free_port()
    http = HttpConfig(**({"header_timeout_s": 0.5, "max_connections": 8} | limits))
    server = uvicorn.Server(uvicorn.Config(_ok, host="127.0.0.1", port=port, log_level="error",
                                           http=edge_protocol(http, rejected.append, base)))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        await scenario(port, rejected)
    finally:
        server.should_exit = True
        await task


async def _read_all(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout_s)


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.__name__)
def test_partial_headers_get_408_and_idle_connections_close(base):
    async def scenario(port: int, rejected: list) -> None:
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"GET / HTTP/1.1\r\nHost: x\r\n")          # headers never end
        r2, _w2 = await asyncio.open_connection("127.0.0.1", port)   # says nothing at all
        partial, idle = await _read_all(r1), await _read_all(r2)
        assert partial.startswith(b"HTTP/1.1 408") and idle == b""
        assert [r.value for r in rejected] == ["timeout"]
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)   # whole requests are served, also slow ones
        w3.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await _read_all(r3)).count(b"HTTP/1.1 200") == 2
        w1.close()

    asyncio.run(_with_server(base, scenario))


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.__name__)
def test_connections_beyond_the_cap_get_503(base):
    async def scenario(port: int, rejected: list) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await _read_all(reader)
        assert answer.startswith(b"HTTP/1.1 503") and b"maximum of 2 connections" in answer
        assert [r.value for r in rejected] == ["too_many_connections"]
        for _, w in held:
            w.close()

    asyncio.run(_with_server(base, scenario, header_timeout_s=30.0, max_connections=2))
