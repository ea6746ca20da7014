"""Prometheus metrics of the gateway: vLLM's series under their ``vllm:`` names (vllm_metrics), and
NEO's own under ``neo:``.

The engine core's state (KV blocks of both pools, requests per pool, swaps, the frames the worker
links dropped) comes from the ``EngineStatus`` it sends when ``/metrics`` asks, so its loop pays
nothing for gauges; per-iteration series are updated from each iteration's ``IterationStats`` (the
offload plan chosen, its predicted vs measured forward time, the wait on CPU attention). Requests
that never ran are counted by why they were refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from neo_common.engine_core_protocol import EngineStatus, IterationStats
from neo_gateway.errors import RejectReason
from neo_gateway.vllm_metrics import VllmMetrics

if TYPE_CHECKING:
    from neo_gateway.async_engine import AsyncEngine, RequestState

_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                 0.25, 0.5, 1.0, 2.5, 5.0)


class _SchedulerState(Collector):
    """NEO's gauges and counters of the engine core, from its last ``EngineStatus``."""

    def __init__(self, engine: "AsyncEngine", model: str) -> None:
        self.engine, self.model = engine, model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.engine.status or EngineStatus(loop_alive=False)
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"neo:{name}", doc, labels=labels)
            g.add_metric([self.model], value)
            return g

        yield gauge("gpu_kv_blocks_total", "GPU KV blocks in the pool.", s.gpu_blocks_total)
        yield gauge("gpu_kv_blocks_free", "GPU KV blocks free.", s.gpu_blocks_free)
        yield gauge("worker_up", "1 while the GPU worker is connected and ready.", 1 if s.worker_up else 0)
        info = GaugeMetricFamily("neo:worker_info", "1, labelled with the device the GPU worker reported (under "
                                 "--emulate-gpu: 'emulated PRESET on GPU', a benchmark instrument).",
                                 labels=labels + ["device", "dtype", "kv_dtype"])
        if s.worker_device:
            info.add_metric([self.model, s.worker_device, s.worker_dtype, s.worker_kv_dtype], 1)
        yield info
        yield gauge("pipeline_overhead_seconds", "Learnt extra time of a pipelined stage beyond the cost tables "
                    "(launches, handoffs, all-reduces); the policy adds it to pipelined plans.", s.pipeline_overhead_s)
        yield gauge("cpu_attention_up", "1 while the cpu_attention processes (one per tensor-parallel rank) are "
                    "connected and ready (0 without offloading).", 1 if s.cpu_attention_up else 0)
        yield gauge("cpu_kv_cache_usage_perc", "Fraction of host (CPU) KV blocks in use (0..1).", s.cpu_usage)
        yield gauge("cpu_kv_blocks_total", "Host (CPU) KV blocks in the pool.", s.cpu_blocks_total)
        decoding = GaugeMetricFamily("neo:num_requests_decoding", "Running requests by where their KV lives "
                                     "(and so where they decode).", labels=labels + ["place"])
        decoding.add_metric([self.model, "gpu"], s.decoding_gpu)
        decoding.add_metric([self.model, "cpu"], s.decoding_cpu)
        yield decoding
        swaps = CounterMetricFamily("neo:swaps", "Requests moved between the GPU and CPU KV pools.",
                                    labels=labels + ["direction"])
        swaps.add_metric([self.model, "out"], s.swapped_out)
        swaps.add_metric([self.model, "in"], s.swapped_in)
        yield swaps
        yield from self._prefix_cache(s, labels)

    def _prefix_cache(self, s: EngineStatus, labels: list[str]) -> Iterator:
        """Per-tier hits and the host tier's copies (docs/design.md, "Prefix caching"); vLLM's own
        prefix-cache series (GPU tier) are in vllm_metrics."""
        hits = CounterMetricFamily("neo:prefix_cache_hits", "Prompt tokens an admission found in the prefix cache, "
                                   "by the tier that held them (gpu: shared in place; host: swapped in, or "
                                   "attended there by a CPU-resident request).", labels=labels + ["tier"])
        hits.add_metric([self.model, "gpu"], s.prefix_hit_tokens_gpu)
        hits.add_metric([self.model, "host"], s.prefix_hit_tokens_host)
        yield hits
        for name, doc, value in (
                ("demoted_bytes", "KV bytes of cached GPU blocks copied to the host tier when evicted.",
                 s.demoted_bytes),
                ("promoted_bytes", "KV bytes of host-tier blocks copied back to the GPU for a prompt.",
                 s.promoted_bytes)):
            family = CounterMetricFamily(f"neo:prefix_cache_{name}", doc, labels=labels)
            family.add_metric([self.model], value)
            yield family
        cached = GaugeMetricFamily("neo:prefix_cache_host_blocks", "Host KV blocks holding cached KV that no "
                                   "request holds (the host tier; taken like free blocks when needed).", labels=labels)
        cached.add_metric([self.model], s.host_cached_blocks)
        yield cached


class _LinkRejections(Collector):
    """``neo:link_frames_rejected_total{link, reason}``: each worker link's rejections, as the core counts them."""

    def __init__(self, engine: "AsyncEngine") -> None:
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("neo:link_frames_rejected", "Frames a worker link dropped (from a peer "
                                     "other than the registered one, undecodable, unexpected, ...), by reason.",
                                     labels=["link", "reason"])
        rejections = self.engine.status.link_rejections if self.engine.status is not None else {}
        for link, counts in rejections.items():
            for reason, count in sorted(counts.items()):
                family.add_metric([link, reason], count)
        yield family


class GatewayMetrics:
    """The gateway's registry (one per app, so tests can run several apps in one process): vLLM's
    series (``vllm``) and NEO's."""

    def __init__(self, engine: "AsyncEngine", model: str) -> None:
        self.model = model
        self.engine = engine
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerState(engine, model))
        self.registry.register(_LinkRejections(engine))
        self.vllm = VllmMetrics(self.registry, engine, model)
        labels = ["model_name"]
        self.rejected = Counter("neo:request_rejected", "Requests refused instead of served, by reason "
                                "(unauthorized, too_large, timeout, overloaded, unavailable, ...).",
                                labels + ["reason"], registry=self.registry)
        for reason in RejectReason:  # exported from the start (zeros), so alerts see the series
            self.rejected.labels(model, reason.value)
        self.iteration = Histogram("neo:iteration_duration_seconds", "Engine core wall time of one "
                                   "iteration: schedule, plan, IPC, worker, outputs.", labels, buckets=_STEP_BUCKETS,
                                   registry=self.registry)
        self.worker_iteration = Histogram("neo:worker_iteration_seconds", "Worker-side time of one iteration "
                                          "(on a GPU, the device's own: CUDA events).", labels,
                                          buckets=_STEP_BUCKETS, registry=self.registry)
        self.launched_ahead = Counter("neo:worker_launched_ahead", "Iterations the worker launched while the "
                                      "previous one still ran (no device gap between them).", labels,
                                      registry=self.registry)
        self.batch_tokens = Counter("neo:iteration_tokens", "Tokens fed to the model, summed over iterations.",
                                    labels, registry=self.registry)
        self.plans = Counter("neo:iteration_plan", "Iterations by the offload policy's plan.", labels + ["plan"],
                             registry=self.registry)
        self.forward_predicted = Histogram(
            "neo:forward_predicted_seconds", "The cost model's forward time of an offload-mode iteration.",
            labels + ["plan"], buckets=_STEP_BUCKETS, registry=self.registry)
        self.forward_measured = Histogram(
            "neo:forward_measured_seconds", "The worker's measured forward time of the same iterations (a "
            "gap to the prediction means a stale or foreign cost table).", labels + ["plan"],
            buckets=_STEP_BUCKETS, registry=self.registry)
        self.cpu_wait = Histogram("neo:cpu_attention_wait_seconds", "Time per iteration the GPU worker waited on "
                                  "the cpu_attention process (pipeline balance: ~0 when CPU attention hides "
                                  "behind GPU work).", labels, buckets=_STEP_BUCKETS, registry=self.registry)
        for plan in ("sequential", "pipelined"):  # exported from the start (zeros), so dashboards see the series
            for family in (self.plans, self.forward_predicted, self.forward_measured):
                family.labels(model, plan)
        self.cpu_wait.labels(model)
        self.launched_ahead.labels(model)
        engine.iteration_hooks.append(self.observe_iteration)

    def observe_iteration(self, stats: IterationStats, got_token: list["RequestState"]) -> None:
        """Core wall vs worker time per iteration: their gap is scheduler + IPC overhead."""
        m = self.model
        self.vllm.observe_iteration(got_token)
        self.iteration.labels(m).observe(stats.wall_s)
        self.worker_iteration.labels(m).observe(stats.worker_s)
        self.launched_ahead.labels(m).inc(stats.launched_ahead)
        self.batch_tokens.labels(m).inc(stats.num_tokens)
        if not stats.plan:
            return
        self.plans.labels(m, stats.plan).inc()
        if stats.predicted_forward_s:
            self.forward_predicted.labels(m, stats.plan).observe(stats.predicted_forward_s)
            self.forward_measured.labels(m, stats.plan).observe(stats.measured_forward_s)
        if stats.cpu_wait_s >= 0:
            self.cpu_wait.labels(m).observe(stats.cpu_wait_s)

    def observe_finished(self, seq: "RequestState") -> None:
        self.vllm.observe_finished(seq)

    def observe_rejected(self, reason: RejectReason) -> None:
        self.rejected.labels(self.model, reason.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
