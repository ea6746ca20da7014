"""The ``vllm:``-named Prometheus series, with vLLM's names, labels, bucket boundaries and meanings
(vLLM v1's ``PrometheusStatLogger`` and ``IterationStats``), so dashboards, KEDA triggers and the
Gateway API Inference Extension's endpoint picker written for vLLM work unchanged.

Labels are vLLM's: ``model_name`` and ``engine`` (one engine here: ``"0"``), plus ``finished_reason``
on ``vllm:request_success``. Per-token series (generation tokens, TTFT and prompt tokens at the first
token, inter-token latency) are updated once per iteration from the requests that got a token in it;
per-request histograms once at a request's end; scheduler state from the engine core's status,
fresh at every scrape.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from neo_common.engine_core_protocol import EngineStatus
from neo_common.enums import FinishReason

if TYPE_CHECKING:
    from neo_gateway.async_engine import AsyncEngine, RequestState

LABELS = ["model_name", "engine"]
ENGINE = "0"
# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)


class _RequestHistogram(NamedTuple):
    """One of vLLM's per-request histograms: observed once, at the request's end, with ``source``
    (of the finished request and the time now)."""

    name: str
    doc: str
    buckets: tuple[float, ...]
    source: Callable[["RequestState", float], float]


def _decode_time(seq: "RequestState") -> float:
    return seq.last_token_time - seq.first_token_time


# vLLM's FinishedRequestStats (in its registration order, which is the order of /metrics)
REQUEST_HISTOGRAMS = (
    _RequestHistogram("request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
                      TOKEN_LATENCY_BUCKETS,
                      lambda s, now: _decode_time(s) / (len(s.output_ids) - 1) if len(s.output_ids) > 1 else 0.0),
    _RequestHistogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                      REQUEST_LATENCY_BUCKETS, lambda s, now: now - s.arrival),
    _RequestHistogram("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                      REQUEST_LATENCY_BUCKETS, lambda s, now: s.scheduled_time - s.arrival),
    _RequestHistogram("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
                      REQUEST_LATENCY_BUCKETS, lambda s, now: s.last_token_time - s.scheduled_time),
    _RequestHistogram("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
                      REQUEST_LATENCY_BUCKETS, lambda s, now: s.first_token_time - s.scheduled_time),
    _RequestHistogram("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
                      REQUEST_LATENCY_BUCKETS, lambda s, now: _decode_time(s)),
)


class _SchedulerSeries(Collector):
    """Gauges and counters vLLM reads from its scheduler, from the engine core's last ``EngineStatus``."""

    def __init__(self, engine: "AsyncEngine", model: str) -> None:
        self.engine, self.model = engine, model

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.engine.status or EngineStatus(loop_alive=False)
        values = [self.model, ENGINE]
        for name, doc, value in (
                ("num_requests_running", "Number of requests in model execution batches.", s.num_running),
                ("num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting),
                ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.gpu_usage)):
            g = GaugeMetricFamily(f"vllm:{name}", doc, labels=LABELS)
            g.add_metric(values, value)
            yield g
        for name, doc, value in (
                ("num_preemptions", "Cumulative number of preemption from the engine.", s.num_preemptions),
                ("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                 s.prefix_queried_tokens),
                ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                 s.prefix_hit_tokens_gpu)):
            c = CounterMetricFamily(f"vllm:{name}", doc, labels=LABELS)
            c.add_metric(values, value)
            yield c


class VllmMetrics:
    """vLLM's per-token and per-request series in ``registry``. ``_seen``: per running request, the
    output tokens already counted and the time of the last one (for the next inter-token latency)."""

    def __init__(self, registry: CollectorRegistry, engine: "AsyncEngine", model: str) -> None:
        self.labels = (model, ENGINE)
        registry.register(_SchedulerSeries(engine, model))

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"vllm:{name}", doc, LABELS, registry=registry)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"vllm:{name}", doc, LABELS, buckets=buckets, registry=registry)

        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       LABELS + ["finished_reason"], registry=registry)
        for reason in FinishReason:   # exported from the start, as vLLM does
            self.request_success.labels(*self.labels, reason.value)
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             TOKEN_LATENCY_BUCKETS)
        self.per_request = [(spec, histogram(spec.name, spec.doc, spec.buckets)) for spec in REQUEST_HISTOGRAMS]
        self._seen: dict[int, tuple[int, float]] = {}

    def observe_tokens(self, seq: "RequestState") -> None:
        """Count the output tokens ``seq`` got since the last call: the first one brings its prompt
        tokens and TTFT, each later one an inter-token latency (one per output, as vLLM's)."""
        count, last_time = self._seen.get(seq.seq_id, (0, None))
        new = len(seq.output_ids) - count
        if new <= 0 or seq.last_token_time is None:
            return
        self.generation_tokens.labels(*self.labels).inc(new)
        if count == 0:
            self.prompt_tokens.labels(*self.labels).inc(len(seq.prompt_ids))
            self.ttft.labels(*self.labels).observe(seq.first_token_time - seq.arrival)
        else:
            self.itl.labels(*self.labels).observe(seq.last_token_time - last_time)
        self._seen[seq.seq_id] = (len(seq.output_ids), seq.last_token_time)

    def observe_iteration(self, got_token: list["RequestState"]) -> None:
        """The running requests that got a token (a finished one was counted by observe_finished)."""
        for seq in got_token:
            self.observe_tokens(seq)

    def observe_finished(self, seq: "RequestState") -> None:
        """vLLM's FinishedRequestStats: the request's phases, from its arrival, first scheduling,
        first and last token (a request that never got a token is counted by reason only)."""
        self.observe_tokens(seq)
        self._seen.pop(seq.seq_id, None)
        m = self.labels
        reason = seq.finish_reason.value if seq.finish_reason else FinishReason.ABORT.value
        self.request_success.labels(*m, reason).inc()
        if seq.first_token_time is None or seq.scheduled_time is None or seq.last_token_time is None:
            return
        now = time.monotonic()
        for spec, hist in self.per_request:
            hist.labels(*m).observe(spec.source(seq, now))
