"""A hostile HTTP client gets a 4xx/5xx or a closed connection within the configured limits, and the
replica keeps serving everyone else: chunked bodies over the limit, a 16 MB prompt, slowloris
connections, slow bodies, idle keep-alive connections, a connection flood, a burst into an idle
server, and the metrics that count aborted and rejected requests.

All tests share one real `neo serve` replica started with short timeouts (loopback only)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import select
import socket
import threading
import time

import httpx
import pytest

from support.replica import Replica, descendants, wait_until

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
MAX_BODY = 32 * 1024 * 1024  # large enough that a 16 MB prompt is read whole
HEADER_TIMEOUT_S, BODY_TIMEOUT_S, KEEP_ALIVE_S = 1.5, 2.0, 1.0
MAX_CONNECTIONS = 60
MAX_NUM_SEQS, MAX_WAITING = 8, 2


@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> Replica:
    r = Replica(["--max-request-bytes", str(MAX_BODY), "--header-timeout-s", str(HEADER_TIMEOUT_S),
                 "--body-timeout-s", str(BODY_TIMEOUT_S), "--keep-alive-s", str(KEEP_ALIVE_S),
                 "--max-connections", str(MAX_CONNECTIONS), "--max-num-seqs", str(MAX_NUM_SEQS),
                 "--max-waiting", str(MAX_WAITING)],
                str(tmp_path_factory.mktemp("edge") / "serve.log"))
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()


# -- helpers -------------------------------------------------------------------------------------
def metric(url: str, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when the series is absent)."""
    want = {"model_name": MODEL, **labels}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"^([^{ ]+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))) == want:
            return float(m.group(3))
    return 0.0


def complete(url: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0} | extra
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict, bytes]:
    """Status, headers and body of the HTTP response on ``sock`` (read until the body is whole or
    the server closes)."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0] else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", 0))
    try:
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except OSError:
        pass
    return status, headers, body


def closed_by_server(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closes ``sock`` (None if it stays open for ``timeout``)."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return time.monotonic() - t0
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - t0
    except socket.timeout:
        return None


# -- 1. body limit on chunked bodies -------------------------------------------------------------
def test_chunked_body_over_the_limit_gets_413_without_being_read(edge):
    """64 MiB sent with Transfer-Encoding: chunked (no Content-Length) against a 32 MiB limit: 413
    with param "body" once the limit is passed, the rest never read, the server still serves."""
    before = metric(edge.url, "neo:request_rejected_total", reason="too_large")
    sock = socket.create_connection(("127.0.0.1", edge.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    frame = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    total, sent, pending = 64 * 1024 * 1024, 0, b""
    sock.setblocking(False)
    t0 = time.monotonic()
    try:
        while sent < total and time.monotonic() - t0 < 60:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                break  # the server answered before the body ended
            if writable:
                pending = pending or frame
                n = sock.send(pending)
                pending = pending[n:]
                sent += n
        if sent >= total:
            sock.setblocking(True)
            sock.sendall(pending + b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed its side after answering: the answer is still to be read
    status, _, body = read_response(sock, 30)
    elapsed = time.monotonic() - t0
    sock.close()
    assert status == 413, (status, body[:200])
    err = json.loads(body)["error"]
    assert err["param"] == "body" and err["type"] == "invalid_request_error"
    assert sent < 48 * 1024 * 1024, f"the server read {sent} bytes of a body over its {MAX_BODY}-byte limit"
    assert elapsed < 20
    assert metric(edge.url, "neo:request_rejected_total", reason="too_large") == before + 1
    assert complete(edge.url).status_code == 200


def test_chunked_body_over_the_limit_from_httpx(edge):
    """The same through an ordinary client streaming a lazily generated body: it sees the 413."""
    def body():
        for _ in range(1024):  # 64 MiB, generated as it is sent
            yield b"y" * 0x10000

    t0 = time.monotonic()
    resp = httpx.post(edge.url + "/v1/completions", content=body(), timeout=60,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["param"] == "body"
    assert time.monotonic() - t0 < 20


# -- 2. tokenization off the event loop ------------------------------------------------------------
def gateway_peak_rss_mb(replica: Replica) -> float:
    """Peak resident memory (VmHWM) of the replica's gateway process."""
    for pid in descendants(replica.proc.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"\0gateway\0" in f.read():
                with open(f"/proc/{pid}/status") as status:
                    return next(int(ln.split()[1]) / 1024 for ln in status if ln.startswith("VmHWM:"))
    raise LookupError("no gateway process")


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_16mb_prompt_is_rejected_while_health_keeps_answering(edge, route):
    """A 16.8 MB prompt (far beyond the context), posted three times, is answered 400 with vLLM's
    context-length wording; meanwhile /health, polled every 20 ms, answers within 100 ms (p99) and
    the gateway's memory stays bounded (it grew by 850 MB when the prompt was tokenized whole)."""
    text = "hello world " * 1_400_000
    if route == "completions":
        path, body, param = "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}, "prompt"
    else:
        path, param = "/v1/chat/completions", "messages"
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    payload = json.dumps(body).encode()
    peak_before = gateway_peak_rss_mb(edge)
    responses: list[httpx.Response] = []

    def post() -> None:
        for _ in range(3):
            responses.append(httpx.post(edge.url + path, content=payload, timeout=120,
                                        headers={"content-type": "application/json"}))

    latencies = []
    with httpx.Client(timeout=60) as probe:
        probe.get(edge.url + "/health")  # connect first: only the server's answer time is measured
        poster = threading.Thread(target=post)
        poster.start()
        while poster.is_alive():
            t0 = time.monotonic()
            assert probe.get(edge.url + "/health").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
        poster.join()
    assert len(responses) == 3
    for resp in responses:
        assert resp.status_code == 400, resp.text[:300]
        err = resp.json()["error"]
        assert err["param"] == param and "maximum context length" in err["message"]
    latencies.sort()
    p99 = latencies[math.ceil(0.99 * len(latencies)) - 1]  # nearest rank: the max below 100 probes
    assert p99 < 0.1, f"/health p99 {p99 * 1000:.0f} ms over {len(latencies)} probes (max {latencies[-1]:.2f} s)"
    grown = gateway_peak_rss_mb(edge) - peak_before
    assert grown < 400, f"the gateway's peak memory grew by {grown:.0f} MB"


# -- 3. timeouts and the connection limit ---------------------------------------------------------
def test_slowloris_connections_are_closed_and_others_served(edge):
    """50 connections that send a request line and headers a byte every 100 ms are closed by the
    header timeout; ordinary requests made meanwhile all succeed."""
    payload = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    bound_s = HEADER_TIMEOUT_S + 3.0  # each connection stops trying after this (bounded test)
    before = metric(edge.url, "neo:request_rejected_total", reason="timeout")

    async def loris() -> float | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        t0 = time.monotonic()
        try:
            for byte in payload:
                if time.monotonic() - t0 > bound_s:
                    return None
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    if not await asyncio.wait_for(reader.read(4096), 0.1):
                        return time.monotonic() - t0  # EOF: the server closed it
                except asyncio.TimeoutError:
                    pass
            return None
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
        finally:
            writer.close()

    async def normal(client: httpx.AsyncClient) -> list[int]:
        codes = []
        for _ in range(4):
            await asyncio.sleep(0.3)
            codes.append((await client.get(edge.url + "/health")).status_code)
            codes.append((await client.post(edge.url + "/v1/completions", json={
                "model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0})).status_code)
        return codes

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(asyncio.gather(*(loris() for _ in range(50))), normal(client))

    closed, codes = asyncio.run(scenario())
    assert all(c == 200 for c in codes), codes
    still_open = sum(c is None for c in closed)
    assert still_open == 0, f"{still_open} of 50 slowloris connections still open after {bound_s} s"
    assert max(closed) < HEADER_TIMEOUT_S + 1.5, sorted(closed)[-5:]
    assert metric(edge.url, "neo:request_rejected_total", reason="timeout") >= before + 50


def test_slow_body_gets_408(edge):
    """Headers whole, the body trickles: 408 after --body-timeout-s, connection closed."""
    sock = socket.create_connection(("127.0.0.1", edge.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": ")
    t0 = time.monotonic()
    status, headers, body = read_response(sock, BODY_TIMEOUT_S + 5)
    elapsed = time.monotonic() - t0
    assert status == 408, (status, body)
    assert json.loads(body)["error"]["param"] == "body" and headers.get("connection") == "close"
    assert BODY_TIMEOUT_S - 0.5 < elapsed < BODY_TIMEOUT_S + 2
    assert closed_by_server(sock, 3) is not None
    sock.close()


def test_idle_keep_alive_connection_is_closed(edge):
    sock = socket.create_connection(("127.0.0.1", edge.port))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, _, _ = read_response(sock, 10)
    assert status == 200
    idle = closed_by_server(sock, KEEP_ALIVE_S + 5)
    sock.close()
    assert idle is not None and idle < KEEP_ALIVE_S + 1.0, idle


def test_connections_beyond_the_limit_get_503(edge):
    before = metric(edge.url, "neo:request_rejected_total", reason="too_many_connections")
    held = [socket.create_connection(("127.0.0.1", edge.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # let the server accept them all
        resp = httpx.get(edge.url + "/health", timeout=10)
        assert resp.status_code == 503, resp.text
        assert resp.headers.get("retry-after") and resp.json()["error"]["type"] == "service_unavailable_error"
    finally:
        for s in held:
            s.close()
    assert wait_until(lambda: httpx.get(edge.url + "/health", timeout=10).status_code == 200, 5)
    assert metric(edge.url, "neo:request_rejected_total", reason="too_many_connections") == before + 1


# -- 4. admission: 429 only beyond running + waiting capacity -------------------------------------
def test_burst_into_an_idle_server_gets_no_429(edge):
    """max_num_seqs + max_waiting requests at once into an idle replica: every one is served."""
    n = MAX_NUM_SEQS + MAX_WAITING

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": MODEL, "prompt": "Count to ten:", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(*(client.post(edge.url + "/v1/completions", json=body) for _ in range(n)))

    codes = [r.status_code for r in asyncio.run(burst())]
    assert codes == [200] * n, codes


# -- 5. aborted and rejected requests in /metrics --------------------------------------------------
def test_aborted_and_rejected_requests_are_counted(edge):
    before_abort = metric(edge.url, "vllm:request_success_total", finished_reason="abort", engine="0")
    before_invalid = metric(edge.url, "neo:request_rejected_total", reason="invalid")
    before_large = metric(edge.url, "neo:request_rejected_total", reason="too_large")
    long = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    with httpx.stream("POST", edge.url + "/v1/completions", json=long | {"stream": True}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # hang up mid-stream
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(edge.url + "/v1/completions", json=long, timeout=1.0)  # gives up waiting
    assert wait_until(lambda: metric(edge.url, "vllm:request_success_total", finished_reason="abort", engine="0")
                      == before_abort + 2, 15), "aborted requests are not counted"
    assert complete(edge.url, temperature=-1).status_code == 400
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:  # a declared length over the limit
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        assert read_response(sock, 10)[0] == 413
    assert metric(edge.url, "neo:request_rejected_total", reason="invalid") == before_invalid + 1
    assert metric(edge.url, "neo:request_rejected_total", reason="too_large") == before_large + 1


def test_link_frame_rejections_are_exported(edge):
    """Each worker link's dropped frames, by reason (zero samples on a healthy replica, but the
    family is there for alerts)."""
    text = httpx.get(edge.url + "/metrics", timeout=10).text
    assert "# TYPE neo:link_frames_rejected_total counter" in text
    for line in text.splitlines():
        if line.startswith("neo:link_frames_rejected_total{"):
            assert re.search(r'link="[^"]+",reason="[^"]+"', line), line
