"""Prometheus metrics of the gateway: vLLM's series under their ``vllm:`` names (vllm_metrics), and
NEO's own under ``neo:``.

Scheduler state (KV blocks of both pools, requests per pool, swaps) is read at scrape time by a
collector, so the iteration loop pays nothing for gauges; per-iteration series are updated once per
iteration (the offload plan chosen, its predicted vs measured forward time, the wait on CPU
attention). Requests that never ran are counted by why they were refused; frames the worker links
dropped, by link and reason (read from the links at scrape time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from neo_gateway.errors import RejectReason
from neo_gateway.vllm_metrics import VllmMetrics

if TYPE_CHECKING:
    from neo_gateway.engine import Engine
    from neo_gateway.sequence import Sequence

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

        yield gauge("gpu_kv_blocks_total", "GPU KV blocks in the pool.", sched.gpu.num_blocks if sched else 0)
        yield gauge("gpu_kv_blocks_free", "GPU KV blocks free.", sched.gpu.num_free if sched else 0)
        yield gauge("worker_up", "1 while the GPU worker is connected and ready.", 1 if self.engine.link.alive else 0)
        ready = self.engine.link.ready
        info = GaugeMetricFamily("neo:worker_info", "1, labelled with the device the GPU worker reported (under "
                                 "--emulate-gpu: 'emulated PRESET on GPU', a benchmark instrument).",
                                 labels=labels + ["device", "dtype", "kv_dtype"])
        if ready is not None:
            info.add_metric([self.model, ready.device, ready.dtype, ready.kv_dtype], 1)
        yield info
        yield gauge("pipeline_overhead_seconds", "Learnt extra time of a pipelined stage beyond the cost tables "
                    "(launches, handoffs, all-reduces); the policy adds it to pipelined plans.",
                    sched.calibration.overhead_s if sched else 0.0)
        links = self.engine.cpu_links
        yield gauge("cpu_attention_up", "1 while the cpu_attention processes (one per tensor-parallel rank) are "
                    "connected and ready (0 without offloading).", 1 if links and all(l.alive for l in links) else 0)
        cpu = sched.cpu if sched else None
        yield gauge("cpu_kv_cache_usage_perc", "Fraction of host (CPU) KV blocks in use (0..1).", cpu.usage if cpu else 0)
        yield gauge("cpu_kv_blocks_total", "Host (CPU) KV blocks in the pool.", cpu.num_blocks if cpu else 0)
        decoding = GaugeMetricFamily("neo:num_requests_decoding", "Running requests by where their KV lives "
                                     "(and so where they decode).", labels=labels + ["place"])
        decoding.add_metric([self.model, "gpu"], len(sched.running) if sched else 0)
        decoding.add_metric([self.model, "cpu"], len(sched.cpu_queue) if sched else 0)
        yield decoding
        swaps = CounterMetricFamily("neo:swaps", "Requests moved between the GPU and CPU KV pools.",
                                    labels=labels + ["direction"])
        swaps.add_metric([self.model, "out"], sched.num_swapped_out if sched else 0)
        swaps.add_metric([self.model, "in"], sched.num_swapped_in if sched else 0)
        yield swaps
        yield from self._prefix_cache(sched, labels)

    def _prefix_cache(self, sched, labels: list[str]) -> Iterator:
        """Per-tier hits and the host tier's copies (docs/design.md, "Prefix caching"); vLLM's own
        prefix-cache series (GPU tier) are in vllm_metrics."""
        host = sched.host if sched else None
        hits = CounterMetricFamily("neo:prefix_cache_hits", "Prompt tokens an admission found in the prefix cache, "
                                   "by the tier that held them (gpu: shared in place; host: swapped in, or "
                                   "attended there by a CPU-resident request).", labels=labels + ["tier"])
        hits.add_metric([self.model, "gpu"], sched.gpu.hit_tokens if sched else 0)
        hits.add_metric([self.model, "host"], sched.cpu.hit_tokens if host else 0)
        yield hits
        for name, doc, blocks in (
                ("demoted_bytes", "KV bytes of cached GPU blocks copied to the host tier when evicted.",
                 host.num_demoted_blocks if host else 0),
                ("promoted_bytes", "KV bytes of host-tier blocks copied back to the GPU for a prompt.",
                 host.num_promoted_blocks if host else 0)):
            family = CounterMetricFamily(f"neo:prefix_cache_{name}", doc, labels=labels)
            family.add_metric([self.model], blocks * (host.block_bytes if host else 0))
            yield family
        cached = GaugeMetricFamily("neo:prefix_cache_host_blocks", "Host KV blocks holding cached KV that no "
                                   "request holds (the host tier; taken like free blocks when needed).", labels=labels)
        cached.add_metric([self.model], len(sched.cpu.evictable) if host else 0)
        yield cached


class _LinkRejections(Collector):
    """``neo:link_frames_rejected_total{link, reason}``: each worker link's ``rejected`` Counter."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("neo:link_frames_rejected", "Frames a worker link dropped (from a peer "
                                     "other than the registered one, undecodable, unexpected, ...), by reason.",
                                     labels=["link", "reason"])
        for link in self.engine.links:
            for reason, count in sorted(getattr(link, "rejected", {}).items()):
                family.add_metric([link.name, str(getattr(reason, "value", reason))], count)
        yield family


class GatewayMetrics:
    """The gateway's registry (one per app, so tests can run several apps in one process): vLLM's
    series (``vllm``) and NEO's."""

    def __init__(self, engine: "Engine", model: str) -> None:
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
        self.iteration = Histogram("neo:iteration_duration_seconds", "Gateway wall time of one iteration: "
                                   "schedule, plan, IPC, worker, outputs.", labels, buckets=_STEP_BUCKETS,
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

    def observe_iteration(self, output, result, wall_s: float) -> None:
        """Gateway wall vs worker time per iteration: their gap is scheduler + IPC overhead."""
        m = self.model
        self.vllm.observe_iteration(output)
        self.iteration.labels(m).observe(wall_s)
        self.worker_iteration.labels(m).observe(result.total_s)
        self.launched_ahead.labels(m).inc(bool(result.launched_ahead))
        self.batch_tokens.labels(m).inc(sum(r.num_tokens for r in output.rows))
        decision = output.decision
        if decision is None:
            return
        plan = "pipelined" if output.pipelined else "sequential"
        self.plans.labels(m, plan).inc()
        num_layers = self.num_layers()
        if num_layers:
            self.forward_predicted.labels(m, plan).observe(decision.predicted_forward_s(num_layers))
            self.forward_measured.labels(m, plan).observe(result.forward_s - result.swap_s)
        if output.cpu_rows:
            self.cpu_wait.labels(m).observe(result.cpu_wait_s)

    def num_layers(self) -> int:
        ready = self.engine.link.ready
        return ready.geometry.num_layers if ready is not None else 0

    def observe_finished(self, seq: "Sequence") -> None:
        self.vllm.observe_finished(seq)

    def observe_rejected(self, reason: RejectReason) -> None:
        self.rejected.labels(self.model, reason.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
