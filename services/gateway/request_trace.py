"""Trace shapes of a request: its phase spans, and the context an iteration plan carries.

Phases are recorded by the API server once a request ends, as children of its server span with the
times noted on the way (queue: arrival -> first scheduled; prefill: -> first token; decode: -> last
token), so the iteration loop does no tracing work per token.
"""

from __future__ import annotations

from opentelemetry import trace

from neo_common import tracing
from neo_gateway.scheduler import SchedulerOutput

_tracer = tracing.tracer("neo.gateway.engine")


def record_phases(seq, model: str) -> None:
    """Phase spans under the request's span, plus GenAI attributes on it (the span is still open).
    ``seq``: the API server's ``async_engine.RequestState`` (not imported: the engine core imports
    this module for ``iteration_trace``)."""
    span = seq.span
    if span is None or not span.get_span_context().is_valid:
        return
    span.set_attribute("gen_ai.request.model", model)
    span.set_attribute("gen_ai.usage.input_tokens", len(seq.prompt_ids))
    span.set_attribute("gen_ai.usage.output_tokens", len(seq.output_ids))
    span.set_attribute("gen_ai.request.max_tokens", seq.params.max_tokens)
    span.set_attribute("gen_ai.request.temperature", seq.params.temperature)
    if seq.finish_reason is not None:
        span.set_attribute("gen_ai.response.finish_reasons", [seq.finish_reason.value])
    parent = trace.set_span_in_context(span)
    marks = [("queue", seq.arrival, seq.scheduled_time), ("prefill", seq.scheduled_time, seq.first_token_time),
             ("decode", seq.first_token_time, seq.last_token_time)]
    for name, start, end in marks:
        if start is None or end is None:
            continue
        phase = _tracer.start_span(name, context=parent, start_time=seq.wall_ns(start))
        if name == "decode":
            phase.set_attribute("gen_ai.usage.output_tokens", len(seq.output_ids))
        phase.end(end_time=seq.wall_ns(end))


def iteration_trace(output: SchedulerOutput) -> dict:
    """Context for the workers' iteration span: the oldest traced request is its parent, every
    traced request in the batch a link (one iteration serves many requests); ``seq_ids`` says which
    request each is, so a process serving part of the batch (cpu_attention) picks among its own rows
    (``neo_common.tracing.iteration_parent``). Built in the engine core from the traceparents the
    API server sent with each request."""
    pairs = [(r.seq.seq_id, r.seq.traceparent) for r in output.rows if r.seq.traceparent]
    if not pairs:
        return {}
    parents = [tp for _, tp in pairs]
    return {"traceparent": parents[0], "links": parents[1:], "seq_ids": [int(sid) for sid, _ in pairs],
            "iteration_id": output.iteration_id}
