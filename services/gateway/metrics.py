"""Prometheus metrics of the gateway, with vLLM-compatible names under the ``neo:`` prefix.

Scheduler state (running/waiting requests, KV usage, free blocks) is read at scrape time by a
collector, so the iteration loop pays nothing for gauges; per-request counters and histograms are
updated once per request at its end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from neo_gateway.engine import Engine
    from neo_gateway.sequence import Sequence

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)


_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                 0.25, 0.5, 1.0, 2.5, 5.0)


class _SchedulerState(Collector):
    def __init__(self, engine: "Engine", model: str) -> None:
        self.engine, self.model = engine, model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sched = self.engine.scheduler
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"neo:{name}", doc, labels=labels)
            g.add_metric([self.model], value)
            return g

        yield gauge("num_requests_running", "Requests holding KV and being served.",
                    sched.num_running if sched else 0)
        yield gauge("num_requests_waiting", "Requests queued for admission.", sched.num_waiting if sched else 0)
        yield gauge("kv_cache_usage_perc", "Fraction of GPU KV blocks in use (0..1).", sched.gpu.usage if sched else 0)
        yield gauge("gpu_kv_blocks_total", "GPU KV blocks in the pool.", sched.gpu.num_blocks if sched else 0)
        yield gauge("gpu_kv_blocks_free", "GPU KV blocks free.", sched.gpu.num_free if sched else 0)
        yield gauge("num_preemptions_total", "Requests preempted (recompute) so far.",
                    sched.num_preemptions if sched else 0)
        yield gauge("worker_up", "1 while the GPU worker is connected and ready.", 1 if self.engine.link.alive else 0)


class GatewayMetrics:
    """The gateway's registry (one per app, so tests can run several apps in one process)."""

    def __init__(self, engine: "Engine", model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerState(engine, model))
        labels = ["model_name"]
        self.prompt_tokens = Counter("neo:prompt_tokens", "Prefilled prompt tokens.", labels, registry=self.registry)
        self.generation_tokens = Counter("neo:generation_tokens", "Generated tokens.", labels, registry=self.registry)
        self.request_success = Counter("neo:request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("neo:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("neo:inter_token_latency_seconds", "Mean time between tokens of a request.",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.iteration = Histogram("neo:iteration_duration_seconds", "Gateway wall time of one iteration: "
                                   "schedule, plan, IPC, worker, outputs.", labels, buckets=_STEP_BUCKETS,
                                   registry=self.registry)
        self.worker_iteration = Histogram("neo:worker_iteration_seconds", "Worker-side time of one iteration "
                                          "(its own clock).", labels, buckets=_STEP_BUCKETS, registry=self.registry)
        self.batch_tokens = Counter("neo:iteration_tokens", "Tokens fed to the model, summed over iterations.",
                                    labels, registry=self.registry)
        engine.iteration_hooks.append(self.observe_iteration)
        self.e2e = Histogram("neo:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)

    def observe_iteration(self, output, result, wall_s: float) -> None:
        """Gateway wall vs worker time per iteration: their gap is scheduler + IPC overhead."""
        m = self.model
        self.iteration.labels(m).observe(wall_s)
        self.worker_iteration.labels(m).observe(result.total_s)
        self.batch_tokens.labels(m).inc(sum(r.num_tokens for r in output.rows))

    def observe_finished(self, seq: "Sequence") -> None:
        m = self.model
        self.prompt_tokens.labels(m).inc(len(seq.prompt_ids))
        self.generation_tokens.labels(m).inc(len(seq.output_ids))
        self.request_success.labels(m, seq.finish_reason.value if seq.finish_reason else "unknown").inc()
        if seq.first_token_time is not None:
            self.ttft.labels(m).observe(seq.first_token_time - seq.arrival)
            if len(seq.output_ids) > 1 and seq.last_token_time is not None:
                self.itl.labels(m).observe((seq.last_token_time - seq.first_token_time) / (len(seq.output_ids) - 1))
            if seq.last_token_time is not None:
                self.e2e.labels(m).observe(seq.last_token_time - seq.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
