"""Traces across processes through a real OTLP collector (rotel).

gateway, gpu_worker and cpu_attention export OTLP/HTTP to a rotel agent, which forwards to a small
OTLP/HTTP receiver in this test (``support.otlp``); one chat request's trace must hold the gateway's
server span, its queue / prefill / decode phases, the GPU worker's iteration spans and, with every
decode offloaded, the cpu_attention process's iteration spans (rows, context tokens, kernel and
doorbell-wait times) and the request's own span over its CPU decodes, each with the right parent.
"""

from __future__ import annotations

import httpx
import pytest

from support.otlp import attributes, collector  # noqa: F401 (the fixture)
from support.replica import Replica

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"

OFFLOAD_FULL = ["--offload-mode", "full", "--num-cpu-blocks", "64", "--kv-cache-dtype", "bfloat16",
                "--cpu-threads", "1"]


@pytest.mark.parametrize("offload", ["off", "full"])
def test_one_request_trace_spans_gateway_and_worker(offload, collector, tmp_path):
    env = dict(collector.env(), NEO_COST_CACHE_DIR=str(tmp_path / "cost"))
    wanted = {"POST /v1/chat/completions", "decode", "gpu_worker.iteration"}
    if offload == "full":  # every decode runs in the cpu_attention process: its spans join the trace
        wanted |= {"cpu_attention.iteration", "cpu_attention.request"}
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
        collector.wait_for(lambda spans: wanted <= {s.name for _, s in spans if s.trace_id.hex() == client_trace})
    finally:
        replica.stop()
    ours = [(svc, s) for svc, s in collector.spans() if s.trace_id.hex() == client_trace]
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
        cpu = sorted(by_name["cpu_attention.iteration"], key=lambda p: attributes(p[1])["neo.iteration_id"])
        assert len(cpu) >= 5, "one span per decode step the CPU attended"
        assert all(svc == "neo-cpu-attention" and s.parent_span_id == request.span_id for svc, s in cpu)
        cpu_attrs = [attributes(s) for _, s in cpu]
        assert all(sum(a["neo.cpu_rows"]) == 1 for a in cpu_attrs), "this request's row, in one sub-batch"
        tokens = [a["neo.cpu_context_tokens"] for a in cpu_attrs]
        assert tokens == list(range(tokens[0], tokens[0] + len(tokens))), "one more token of context per step"
        assert tokens[0] > attrs["gen_ai.usage.input_tokens"].int_value, "the prompt's tokens and the first"
        for (_, span), a in zip(cpu, cpu_attrs):
            duration_ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
            assert a["neo.cpu_status"] == "OK" and a["neo.jobs"] > 0
            assert a["neo.cpu_busy_ms"] > 0 and a["neo.cpu_wait_ms"] >= 0
            assert a["neo.cpu_busy_ms"] + a["neo.cpu_wait_ms"] <= duration_ms + 0.5, "both within the span"
        (svc, stretch), = by_name["cpu_attention.request"]   # its decodes, one stretch of CPU iterations
        assert svc == "neo-cpu-attention" and stretch.parent_span_id == request.span_id
        a = attributes(stretch)
        assert a["neo.iterations"] == len(cpu) and a["neo.cpu_context_tokens"] == tokens[-1]
        assert (a["neo.first_iteration_id"], a["neo.last_iteration_id"]) == (cpu_attrs[0]["neo.iteration_id"],
                                                                            cpu_attrs[-1]["neo.iteration_id"])
        assert cpu[0][1].start_time_unix_nano <= stretch.start_time_unix_nano
        assert stretch.end_time_unix_nano <= cpu[-1][1].end_time_unix_nano


def test_tracing_is_off_without_an_endpoint():
    from neo_common.tracing import tracing_wanted

    assert not tracing_wanted({})
    assert tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
