"""What serving one ``CpuAttentionPlan`` did, and the ``cpu_attention.iteration`` span that shows it.

With tracing on, an iteration whose CPU rows include a traced request is one span in that request's
trace (the first such request is its parent, the others' traces link to it; see
``neo_common.tracing.iteration_parent``). Its attributes answer "was the CPU the bottleneck?":
``neo.cpu_busy_ms`` in the attention kernel against ``neo.cpu_wait_ms`` idle on the GPU worker's
doorbells (the GPU had not staged the next layer's inputs yet).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import numpy as np
from opentelemetry.trace import Span, Status, StatusCode

from neo_common import protocol, tracing
from neo_common.enums import NativeStatus

_tracer = tracing.tracer("neo.cpu_attention")
SPAN_NAME = "cpu_attention.iteration"


@dataclasses.dataclass
class ServedIteration:
    """The account of one iteration, filled in while it is served.

    - ``rows``: CPU rows per sub-batch; ``context_tokens``: their context lengths summed (tokens each
      layer attends over, the appended one included).
    - ``jobs``: (layer, sub-batch) jobs served; ``busy_s``: time in the kernel; ``wait_s``: the rest
      of the serving time, spent waiting for doorbells.
    - ``status``: the native loop's final return (None when it never ran); ``error``: why the
      iteration failed (also sent to the gateway).
    - ``start_ns`` / ``end_ns``: wall clock around the serving (the request spans' ends).
    """

    iteration_id: int
    rows: list[int]
    context_tokens: int
    jobs: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0
    status: NativeStatus | None = None
    error: str | None = None
    start_ns: int = 0
    end_ns: int = 0

    @classmethod
    def of(cls, plan: protocol.CpuAttentionPlan) -> "ServedIteration":
        lens = [np.asarray(s) for s in plan.seq_lens]
        return cls(iteration_id=int(plan.iteration_id), rows=[int(s.shape[0]) for s in lens],
                   context_tokens=int(sum(int(s.sum()) for s in lens)))

    def record(self, span: Span) -> None:
        span.set_attribute("neo.iteration_id", self.iteration_id)
        span.set_attribute("neo.cpu_rows", self.rows)
        span.set_attribute("neo.cpu_context_tokens", self.context_tokens)
        span.set_attribute("neo.jobs", self.jobs)
        span.set_attribute("neo.cpu_busy_ms", self.busy_s * 1e3)
        span.set_attribute("neo.cpu_wait_ms", self.wait_s * 1e3)
        if self.status is not None:
            span.set_attribute("neo.cpu_status", self.status.name)
        if self.error is not None:
            span.set_status(Status(StatusCode.ERROR, self.error))


@contextlib.contextmanager
def iteration_span(plan: protocol.CpuAttentionPlan) -> Iterator[Span | None]:
    """The iteration's span, current while it is served; None when no traced request is served."""
    where = None
    if plan.trace:
        served = [int(i) for ids in plan.seq_ids for i in np.asarray(ids).tolist()]
        where = tracing.iteration_parent(plan.trace, served)
    if where is None:
        yield None
        return
    parent, links = where
    with _tracer.start_as_current_span(SPAN_NAME, context=parent, links=links) as span:
        yield span
