"""The operator's own settings: flags, or the `NEO_*` variables the chart sets (like every neo process)."""

from __future__ import annotations

import dataclasses
from typing import Any

from neo_common.settings import ConfigError, Settings, option
from neo_operator.networkpolicy import PeerError, parse_metrics_peers
from neo_operator.sizing import NodeReserve


@dataclasses.dataclass
class OperatorConfig(Settings):
    """Where the operator works and which images it uses when a NeoService names none."""

    namespace: list = option([], "namespaces to watch (comma-separated; empty: all namespaces)")
    probe_namespace: str = option("default", "namespace of the bandwidth probe Jobs (the operator's own)")
    probe_image: str = option("", "image with `neo probe-bandwidth` (default: the cpu-attention image)")
    gateway_image: str = option("", "default gateway image")
    gpu_worker_image: str = option("", "default gpu-worker image")
    cpu_attention_image: str = option("", "default cpu-attention image")
    image_pull_secrets: list = option([], "Secrets (in the operator's namespace) the bandwidth probe Jobs pull "
                                          "their image with (comma-separated; the chart's imagePullSecrets)")
    retry_seconds: float = option(10.0, "how often a NeoService waiting for a bandwidth probe is retried")
    metrics_peers: str = option("", "NetworkPolicy peers (a JSON list of namespaceSelector/podSelector/ipBlock "
                                    "objects) that may scrape every NeoService's /metrics, unless its "
                                    "spec.networkPolicy.metricsFrom says otherwise (empty: none)")
    peering: str = option("", "kopf peering: the name of a ClusterKopfPeering; replicas sharing it elect one active "
                              "operator (the highest --priority), the others wait (empty: standalone, one replica)")
    priority: int = option(0, "this replica's peering priority (0: a random one, so replicas never tie)")
    liveness: str = option("", "kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz (empty: none)")
    node_cpu_reserve: float = option(1.0, "CPUs of each node's allocatable a replica leaves to DaemonSets and system "
                                          "pods, at least (the larger of this and --node-reserve-fraction counts)")
    node_memory_reserve_gib: float = option(1.5, "GiB of each node's allocatable memory a replica leaves to "
                                                 "DaemonSets and system pods, at least")
    node_reserve_fraction: float = option(0.05, "fraction of each node's allocatable CPUs and memory a replica "
                                                "leaves to others, when larger than the minimums")
    verbose: bool = option(False, "debug logging")

    def validate(self) -> None:
        if self.retry_seconds <= 0:
            raise ConfigError("--retry-seconds must be > 0")
        if self.node_cpu_reserve < 0 or self.node_memory_reserve_gib < 0:
            raise ConfigError("--node-cpu-reserve and --node-memory-reserve-gib must be >= 0")
        if not 0 <= self.node_reserve_fraction < 1:
            raise ConfigError("--node-reserve-fraction must be within [0, 1)")
        try:
            parse_metrics_peers(self.metrics_peers)
        except PeerError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def node_reserve(self) -> NodeReserve:
        return NodeReserve(cpu_min=self.node_cpu_reserve, memory_min=int(self.node_memory_reserve_gib * (1 << 30)),
                           fraction=self.node_reserve_fraction)

    @property
    def default_metrics_peers(self) -> tuple[dict[str, Any], ...]:
        return parse_metrics_peers(self.metrics_peers)

    def default_images(self) -> dict[str, str]:
        return {"gateway": self.gateway_image, "gpuWorker": self.gpu_worker_image,
                "cpuAttention": self.cpu_attention_image}

    @property
    def effective_probe_image(self) -> str:
        return self.probe_image or self.cpu_attention_image
