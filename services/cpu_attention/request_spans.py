"""Every traced request's CPU decoding in its own trace: one ``cpu_attention.request`` span per stretch.

An iteration span lies in one request's trace only (``iteration``: one iteration serves many
requests, and a span per request and iteration would cost a span per row per step). This span puts
each traced request's time in this process into that request's trace, as a child of its span: it
starts with the first iteration that attends for the request on the CPU and ends with the last one
of the stretch, which is known when a served plan no longer has the request among its CPU rows
(finished, swapped back to the GPU or preempted) or when no plan came for ``IDLE_END_S`` (the gateway
sends none without CPU rows). Its attributes sum the iterations it was in.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from opentelemetry.trace import Span, Status, StatusCode

from neo_common import protocol, tracing
from neo_cpu_attention.iteration import ServedIteration

_tracer = tracing.tracer("neo.cpu_attention")
SPAN_NAME = "cpu_attention.request"
IDLE_END_S = 0.5   # no plan for this long: the open stretches have ended


@dataclasses.dataclass
class _Stretch:
    """One request's open span and the sums over its iterations so far."""

    span: Span
    first_iteration: int
    last_iteration: int = 0
    iterations: int = 0
    end_ns: int = 0            # wall clock at the end of its last iteration
    context_tokens: int = 0    # its context at its last iteration
    busy_s: float = 0.0
    wait_s: float = 0.0


class RequestSpans:
    """The open stretches of traced requests, by sequence id; ``last_plan``: when the last plan was
    served (monotonic), for :meth:`expire`. Only used with tracing on."""

    def __init__(self) -> None:
        self.open: dict[int, _Stretch] = {}
        self.last_plan = time.monotonic()

    def observe(self, plan: protocol.CpuAttentionPlan, served: ServedIteration) -> None:
        """Account one served plan: open, extend or end the stretches of its traced CPU rows."""
        self.last_plan = time.monotonic()
        traced = tracing.traced_requests(plan.trace)
        lens = {sid: n for ids, ls in zip(plan.seq_ids, plan.seq_lens)
                for sid, n in zip(np.asarray(ids).tolist(), np.asarray(ls).tolist())}
        for sid in [sid for sid in self.open if sid not in lens or sid not in traced]:
            self._end(sid)
        for sid in lens.keys() & traced.keys():
            st = self.open.get(sid)
            if st is None:
                span = _tracer.start_span(SPAN_NAME, context=tracing.context_from_traceparent(traced[sid]),
                                          start_time=served.start_ns)
                st = self.open[sid] = _Stretch(span, first_iteration=served.iteration_id)
            st.last_iteration, st.end_ns, st.context_tokens = served.iteration_id, served.end_ns, lens[sid]
            st.iterations += 1
            st.busy_s += served.busy_s
            st.wait_s += served.wait_s
            if served.error is not None:   # the gateway fails the request: its stretch ends here
                st.span.set_status(Status(StatusCode.ERROR, served.error))
                self._end(sid)

    def expire(self) -> None:
        """End every open stretch once no plan came for ``IDLE_END_S``."""
        if self.open and time.monotonic() - self.last_plan > IDLE_END_S:
            self.close()

    def close(self) -> None:
        for sid in list(self.open):
            self._end(sid)

    def _end(self, sid: int) -> None:
        st = self.open.pop(sid)
        st.span.set_attribute("neo.seq_id", sid)
        st.span.set_attribute("neo.iterations", st.iterations)
        st.span.set_attribute("neo.first_iteration_id", st.first_iteration)
        st.span.set_attribute("neo.last_iteration_id", st.last_iteration)
        st.span.set_attribute("neo.cpu_context_tokens", st.context_tokens)
        st.span.set_attribute("neo.cpu_busy_ms", st.busy_s * 1e3)
        st.span.set_attribute("neo.cpu_wait_ms", st.wait_s * 1e3)
        st.span.end(end_time=st.end_ns)
