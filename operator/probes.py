"""The bandwidth-probe flow: start a probe Job per GPU node, collect finished results into a ConfigMap.

Results are collected by polling the probe namespace (a namespaced list of pods) rather than by a
cluster-wide pod watch, and recorded in the ConfigMap ``neo-bandwidth-probes`` of that namespace (one
key per node name), so the operator needs neither other namespaces' pods nor write access to Nodes.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

import kopf

from neo_operator import constants as c
from neo_operator.kube import Kube
from neo_operator.opconfig import OperatorConfig
from neo_operator.probejob import ProbeResultError, build_probe_job, probe_job_name, probe_pod_result, probe_record

log = logging.getLogger(__name__)


def ensure_probe_jobs(kube: Kube, config: OperatorConfig, nodes: list[Mapping[str, Any]]) -> list[str]:
    """Create the bandwidth probe Job of every given node that has none; returns the Job names created."""
    created: list[str] = []
    image = config.effective_probe_image
    if not image:
        log.warning("no probe image configured (--probe-image / --cpu-attention-image); cannot measure bandwidth")
        return created
    for node in nodes:
        name = probe_job_name(node["metadata"]["name"])
        if kube.job_exists(config.probe_namespace, name):
            continue
        job = build_probe_job(node, image, config.probe_namespace)
        # Owned by the Node: deleting the node garbage-collects its probe. Not kopf.adopt: that would also
        # move the Job into the (cluster-scoped) owner's namespace and copy the node's labels onto it.
        kopf.append_owner_reference(job, owner=dict(node))
        if kube.create_job(job):
            log.info("created bandwidth probe job %s/%s for node %s", config.probe_namespace, name,
                     node["metadata"]["name"])
            created.append(name)
    return created


def collect_probe_results(kube: Kube, namespace: str) -> list[str]:
    """Record the result of every succeeded probe pod under its node's name and delete the Job; returns
    the nodes recorded."""
    recorded = []
    selector = f"{c.COMPONENT_LABEL}={c.PROBE_COMPONENT},{c.MANAGED_BY_LABEL}={c.MANAGED_BY}"
    for pod in kube.list_pods(namespace, selector):
        meta = pod["metadata"]
        node = (meta.get("annotations") or {}).get(c.PROBE_NODE_LABEL)
        try:
            result = probe_pod_result(pod)
        except ProbeResultError as exc:
            log.warning("bandwidth probe pod %s/%s for node %s: %s", namespace, meta["name"], node, exc)
            continue
        if result is None or not node:
            continue
        kube.record_probe_result(namespace, node, probe_record(result))
        log.info("node %s: host read bandwidth %.1f GB/s (%s threads)", node, float(result["read_gbps"]),
                 result.get("threads"))
        recorded.append(node)
        job = next((ref["name"] for ref in meta.get("ownerReferences") or [] if ref.get("kind") == "Job"), None)
        kube.delete_job(namespace, job or probe_job_name(node))
        kube.delete_pod(namespace, meta["name"])
    return recorded


class ProbeCollector:
    """A daemon thread that runs :func:`collect_probe_results` every ``interval`` seconds until stopped;
    ``on_recorded`` gets the nodes whose results were just recorded (the NeoServices sized without
    them are sized again)."""

    def __init__(self, kube: Kube, namespace: str, interval: float,
                 on_recorded: Callable[[list[str]], None] | None = None) -> None:
        self.kube = kube
        self.namespace = namespace
        self.interval = interval
        self.on_recorded = on_recorded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neo-probe-collector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                recorded = collect_probe_results(self.kube, self.namespace)
                if recorded and self.on_recorded is not None:
                    self.on_recorded(recorded)
            except Exception:  # noqa: BLE001 - keep collecting; the API server may be briefly unreachable
                log.exception("collecting bandwidth probe results failed")
            self._stop.wait(self.interval)
