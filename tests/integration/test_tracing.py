"""Traces across processes through a real OTLP collector (rotel).

gateway and gpu_worker export OTLP/HTTP to a rotel agent, which forwards to a small OTLP/HTTP
receiver in this test; one chat request's trace must hold the gateway's server span, its queue /
prefill / decode phases, the GPU worker's iteration spans and, with every decode offloaded, the
cpu_attention process's iteration spans, each with the right parent.
"""

from __future__ import annotations

import gzip
import http.server
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                    ExportTraceServiceResponse)

from support.replica import Replica, free_ports

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"


class _Receiver(http.server.BaseHTTPRequestHandler):
    spans: list = []

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
        for rs in req.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            for ss in rs.scope_spans:
                for span in ss.spans:
                    _Receiver.spans.append((service, span))
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def rotel_agent() -> str:
    import rotel

    path = os.path.join(os.path.dirname(rotel.__file__), "rotel-agent")
    assert os.access(path, os.X_OK), "the rotel package ships its agent binary"
    return path


@pytest.fixture
def collector(tmp_path):
    """rotel listening for OTLP/HTTP, exporting to an in-test receiver; yields the rotel endpoint."""
    recv_port, http_port, grpc_port = free_ports(1, 1, 1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", recv_port), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.spans = []
    log = open(tmp_path / "rotel.log", "wb")
    agent = subprocess.Popen([rotel_agent(), "start", "--otlp-http-endpoint", f"127.0.0.1:{http_port}",
                              "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}", "--exporter", "otlp",
                              "--otlp-exporter-endpoint", f"http://127.0.0.1:{recv_port}",
                              "--otlp-exporter-protocol", "http", "--batch-timeout", "100ms",
                              "--pid-file", str(tmp_path / "rotel.pid")], stdout=log, stderr=log)
    try:
        yield f"http://127.0.0.1:{http_port}"
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        server.shutdown()
        log.close()


OFFLOAD_FULL = ["--offload-mode", "full", "--num-cpu-blocks", "64", "--kv-cache-dtype", "bfloat16",
                "--cpu-threads", "1"]


@pytest.mark.parametrize("offload", ["off", "full"])
def test_one_request_trace_spans_gateway_and_worker(offload, collector, tmp_path):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector, "OTEL_BSP_SCHEDULE_DELAY": "100",
           "OTEL_TRACES_SAMPLER": "parentbased_always_on", "NEO_COST_CACHE_DIR": str(tmp_path / "cost")}
    wanted = {"POST /v1/chat/completions", "decode", "gpu_worker.iteration"}
    if offload == "full":  # every decode runs in the cpu_attention process: its spans join the trace
        wanted.add("cpu_attention.iteration")
    args = ["--num-gpu-blocks", "32"] + (OFFLOAD_FULL if offload == "full" else [])
    replica = Replica(args, str(tmp_path / "serve.log"), env=env)
    try:
        replica.wait_ready()
        client_trace = "0af7651916cd43dd8448eb211c80319c"
        headers = {"traceparent": f"00-{client_trace}-b7ad6b7169203331-01"}
        resp = httpx.post(replica.url + "/v1/chat/completions", headers=headers, timeout=120, json={
            "model": MODEL, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert resp.status_code == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            names = {s.name for _, s in _Receiver.spans if s.trace_id.hex() == client_trace}
            if wanted <= names:
                break
            time.sleep(0.2)
    finally:
        replica.stop()
    unique = {s.span_id: (svc, s) for svc, s in _Receiver.spans}  # a collector may deliver a batch twice
    ours = [(svc, s) for svc, s in unique.values() if s.trace_id.hex() == client_trace]
    by_name: dict[str, list] = {}
    for svc, s in ours:
        by_name.setdefault(s.name, []).append((svc, s))
    assert "POST /v1/chat/completions" in by_name, f"spans seen: {sorted(by_name)}"
    (svc, root), = by_name["POST /v1/chat/completions"]
    assert svc == "neo-gateway" and root.parent_span_id.hex() == "b7ad6b7169203331", "child of the client's span"
    parents = {s.span_id: s.parent_span_id for _, s in ours}
    (_, request), = [(svc, s) for svc, s in ours if s.span_id == by_name["queue"][0][1].parent_span_id]

    def descends(span_id: bytes, ancestor: bytes) -> bool:
        while span_id in parents:
            if span_id == ancestor:
                return True
            span_id = parents[span_id]
        return False

    assert descends(request.span_id, root.span_id), "the request's span lies inside the HTTP server span"
    attrs = {a.key: a.value for a in request.attributes}
    assert attrs["gen_ai.request.model"].string_value == MODEL
    assert attrs["gen_ai.usage.output_tokens"].int_value == 6
    assert attrs["gen_ai.usage.input_tokens"].int_value > 10
    for phase in ("queue", "prefill", "decode"):
        (_, span), = by_name[phase]
        assert span.parent_span_id == request.span_id, phase
    iterations = by_name["gpu_worker.iteration"]
    assert len(iterations) >= 6, "one iteration span per prefill/decode step of this request"
    assert all(svc == "neo-gpu-worker" and s.parent_span_id == request.span_id for svc, s in iterations)
    if offload == "full":
        cpu = by_name["cpu_attention.iteration"]
        assert len(cpu) >= 5, "one span per decode step the CPU attended"
        assert all(svc == "neo-cpu-attention" and s.parent_span_id == request.span_id for svc, s in cpu)
        rows = {a.key: a.value for a in cpu[0][1].attributes}["neo.cpu_rows"].array_value.values
        assert sum(v.int_value for v in rows) == 1, "this request's row, in one sub-batch"


def test_tracing_is_off_without_an_endpoint():
    from neo_common.tracing import tracing_wanted

    assert not tracing_wanted({})
    assert tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
