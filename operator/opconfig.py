"""The operator's own settings: flags, or the `NEO_*` variables the chart sets (like every neo process)."""

from __future__ import annotations

import dataclasses
from typing import Any

from neo_common.settings import ConfigError, Settings, option
from neo_operator.networkpolicy import PeerError, parse_metrics_peers


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
    verbose: bool = option(False, "debug logging")

    def validate(self) -> None:
        if self.retry_seconds <= 0:
            raise ConfigError("--retry-seconds must be > 0")
        try:
            parse_metrics_peers(self.metrics_peers)
        except PeerError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def default_metrics_peers(self) -> tuple[dict[str, Any], ...]:
        return parse_metrics_peers(self.metrics_peers)

    def default_images(self) -> dict[str, str]:
        return {"gateway": self.gateway_image, "gpuWorker": self.gpu_worker_image,
                "cpuAttention": self.cpu_attention_image}

    @property
    def effective_probe_image(self) -> str:
        return self.probe_image or self.cpu_attention_image
