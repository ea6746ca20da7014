"""A real OTLP collector for tracing tests: a rotel agent forwarding to an in-test OTLP/HTTP receiver.

Processes under test export OTLP/HTTP to ``Collector.endpoint`` (rotel); rotel batches and forwards to
the receiver, which keeps every span with its service name. Loopback ports only.
"""

from __future__ import annotations

import gzip
import http.server
import os
import signal
import subprocess
import threading
import time
from typing import Callable, Iterator

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                    ExportTraceServiceResponse)

from support.replica import free_ports


def rotel_agent() -> str:
    import rotel

    path = os.path.join(os.path.dirname(rotel.__file__), "rotel-agent")
    assert os.access(path, os.X_OK), "the rotel package ships its agent binary"
    return path


def _receiver(sink: list, lock: threading.Lock) -> type[http.server.BaseHTTPRequestHandler]:
    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                body = b""
                while (size := int(self.rfile.readline().strip(), 16)):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            else:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.headers.get("content-encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            with lock:
                for rs in req.resource_spans:
                    service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                    for ss in rs.scope_spans:
                        sink.extend((service, span) for span in ss.spans)
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    return Receiver


class Collector:
    """rotel listening for OTLP/HTTP on ``endpoint``, exporting to a receiver in this process."""

    def __init__(self, log_dir) -> None:
        recv_port, http_port, grpc_port = free_ports(1, 1, 1)
        self._spans: list = []
        self._lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", recv_port), _receiver(self._spans, self._lock))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{http_port}"
        self.log = open(os.path.join(log_dir, "rotel.log"), "wb")
        self.agent = subprocess.Popen(
            [rotel_agent(), "start", "--otlp-http-endpoint", f"127.0.0.1:{http_port}",
             "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}", "--exporter", "otlp",
             "--otlp-exporter-endpoint", f"http://127.0.0.1:{recv_port}", "--otlp-exporter-protocol", "http",
             "--batch-timeout", "100ms", "--pid-file", os.path.join(log_dir, "rotel.pid")],
            stdout=self.log, stderr=self.log)

    def env(self) -> dict[str, str]:
        """What a process needs to export here at once, every span sampled."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
                "OTEL_TRACES_SAMPLER": "parentbased_always_on"}

    def spans(self) -> list:
        """(service, span) pairs received so far, each span once (a collector may resend a batch)."""
        with self._lock:
            return list({s.span_id: (svc, s) for svc, s in self._spans}.values())

    def wait_for(self, done: Callable[[list], bool], timeout_s: float = 30.0) -> list:
        deadline = time.monotonic() + timeout_s
        while not done(spans := self.spans()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return spans

    def stop(self) -> None:
        self.agent.send_signal(signal.SIGTERM)
        try:
            self.agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()
        self.server.shutdown()
        self.log.close()


@pytest.fixture
def collector(tmp_path) -> Iterator[Collector]:
    c = Collector(str(tmp_path))
    try:
        yield c
    finally:
        c.stop()


def attributes(span) -> dict:
    """A span's attributes as plain Python values (arrays as lists)."""
    def plain(v):
        kind = v.WhichOneof("value")
        if kind == "array_value":
            return [plain(x) for x in v.array_value.values]
        return getattr(v, kind)
    return {a.key: plain(a.value) for a in span.attributes}
