"""OpenTelemetry tracing for every process, configured only by the standard ``OTEL_*`` variables.

Tracing is on when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and neither ``OTEL_SDK_DISABLED=true`` nor
``OTEL_TRACES_EXPORTER=none`` says otherwise. Off, every call here is a cheap no-op and no SDK is
imported. Sampling follows ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (the SDK reads them).

Across processes, span contexts travel inside ZeroMQ messages as W3C ``traceparent`` strings.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Any, Iterable

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_state = {"enabled": False, "provider": None}


def tracing_wanted(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or env.get("OTEL_TRACES_EXPORTER", "") == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str) -> bool:
    """Install an OTLP/HTTP exporting tracer provider for this process, if tracing is wanted."""
    if _state["enabled"] or not tracing_wanted():
        return _state["enabled"]
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name),
                                "service.namespace": "neo"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _state.update(enabled=True, provider=provider)
    atexit.register(shutdown_tracing)
    log.info("tracing to %s", os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporter (spans still queued are sent)."""
    provider = _state["provider"]
    if provider is not None:
        _state["provider"] = None
        provider.shutdown()


def enabled() -> bool:
    return _state["enabled"]


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def traceparent(span: trace.Span) -> str | None:
    """The W3C traceparent of a span, or None for a non-recording (unsampled/no-op) span."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def context_from_traceparent(value: str | None) -> otel_context.Context | None:
    if not value:
        return None
    return _PROPAGATOR.extract({"traceparent": value})


def span_context_of(value: str) -> SpanContext:
    return trace.get_current_span(_PROPAGATOR.extract({"traceparent": value})).get_span_context()


def links_from(values: Iterable[str]) -> list[Link]:
    return [Link(sc) for sc in (span_context_of(v) for v in values) if sc.is_valid]


def context_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> Any:
    """Parent context from an incoming HTTP request's traceparent/tracestate headers."""
    carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
    return _PROPAGATOR.extract(carrier)


def iteration_parent(trace: dict, served: Iterable[int] | None = None) -> tuple[Any, list[Link]] | None:
    """Parent context and links of a worker's iteration span, from a plan's ``trace`` map.

    The gateway's map names the batch's traced requests: ``traceparent`` (the first), ``links`` (the
    others) and, aligned with them, their ``seq_ids``. Given ``served``, the sequence ids this process
    computed for, the first traced request among them is the parent and the others among them links,
    so a process that serves part of a batch (cpu_attention: the CPU rows) puts its span in the trace
    of a request it worked for; None when it served no traced request. A map without ``seq_ids``
    keeps the batch's parent and links.
    """
    if not trace or not trace.get("traceparent"):
        return None
    parents = [trace["traceparent"], *trace.get("links", ())]
    ids = trace.get("seq_ids")
    if served is not None and isinstance(ids, list) and len(ids) == len(parents):
        wanted = set(served)
        parents = [tp for sid, tp in zip(ids, parents) if sid in wanted]
        if not parents:
            return None
    return context_from_traceparent(parents[0]), links_from(parents[1:])


def traced_requests(trace: dict) -> dict[int, str]:
    """The traceparent of each traced request of a plan's ``trace`` map, by sequence id (empty for a
    map that does not name them)."""
    if not trace or not trace.get("traceparent"):
        return {}
    parents = [trace["traceparent"], *trace.get("links", ())]
    ids = trace.get("seq_ids")
    if not isinstance(ids, list) or len(ids) != len(parents):
        return {}
    return {int(sid): tp for sid, tp in zip(ids, parents)}
