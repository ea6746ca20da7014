"""The bandwidth-probe flow: start a probe Job per GPU node, collect finished results into a ConfigMap.

Results are collected by polling the probe namespace (a namespaced list of pods) rather than by a
cluster-wide pod watch, and recorded in the ConfigMap ``neo-bandwidth-probes`` of that namespace (one
key per node name), so the operator needs neither other namespaces' pods nor write access to Nodes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping

import kopf

from neo_operator import constants as c
from neo_operator.kube import Kube
from neo_operator.opconfig import OperatorConfig
from neo_operator.probejob import (ProbeFailure, ProbeResultError, build_probe_job, probe_failure, probe_job_name,
                                   probe_pod_result, probe_record, probe_retry_delay)

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
        job = build_probe_job(node, image, config.probe_namespace, image_pull_secrets=config.image_pull_secrets)
        # Owned by the Node: deleting the node garbage-collects its probe. Not kopf.adopt: that would also
        # move the Job into the (cluster-scoped) owner's namespace and copy the node's labels onto it.
        kopf.append_owner_reference(job, owner=dict(node))
        if kube.create_job(job):
            log.info("created bandwidth probe job %s/%s for node %s", config.probe_namespace, name,
                     node["metadata"]["name"])
            created.append(name)
    return created


def probe_failures(kube: Kube, namespace: str, nodes: list[str]) -> dict[str, ProbeFailure]:
    """The failed probe Jobs of ``nodes`` (node name -> failure), read from the Jobs and their pods."""
    out = {}
    for node in nodes:
        job = probe_job_name(node)
        failure = probe_failure(kube.get_job(namespace, job), kube.list_pods(namespace, f"job-name={job}"))
        if failure is not None:
            out[node] = failure
    return out


def replace_failed_probe_jobs(kube: Kube, config: OperatorConfig, now: float | None = None) -> list[str]:
    """Replace each failed probe Job whose backoff has passed by a new one (attempt + 1); returns the
    nodes whose Job was replaced. Found through the failed probe pods (the operator may list pods but
    not Jobs in its namespace)."""
    now = time.time() if now is None else now
    namespace = config.probe_namespace
    selector = f"{c.COMPONENT_LABEL}={c.PROBE_COMPONENT},{c.MANAGED_BY_LABEL}={c.MANAGED_BY}"
    replaced = []
    nodes = {(p["metadata"].get("annotations") or {}).get(c.PROBE_NODE_LABEL) for p in kube.list_pods(namespace, selector)
             if (p.get("status") or {}).get("phase") == "Failed"}
    for node, failure in probe_failures(kube, namespace, sorted(n for n in nodes if n)).items():
        if failure.retrying:
            continue   # its Job was replaced already (the failed pod is not yet collected): the retry runs
        if now < failure.failed_at + probe_retry_delay(failure.attempt, config.retry_seconds):
            continue
        node_obj = kube.get_node(node)
        kube.delete_job(namespace, probe_job_name(node))
        if node_obj is None:
            continue  # the node is gone; nothing to measure
        job = build_probe_job(node_obj, config.effective_probe_image, namespace, attempt=failure.attempt + 1,
                              image_pull_secrets=config.image_pull_secrets, last_failure=failure)
        kopf.append_owner_reference(job, owner=dict(node_obj))
        if kube.create_job(job):
            log.info("bandwidth probe of node %s failed (%s); replaced its Job (attempt %d)", node, failure.reason,
                     failure.attempt + 1)
            replaced.append(node)
    return replaced


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

    def __init__(self, kube: Kube, config: OperatorConfig, interval: float,
                 on_recorded: Callable[[list[str]], None] | None = None) -> None:
        self.kube = kube
        self.config = config
        self.namespace = config.probe_namespace
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
                replace_failed_probe_jobs(self.kube, self.config)
            except Exception:  # noqa: BLE001 - keep collecting; the API server may be briefly unreachable
                log.exception("collecting bandwidth probe results failed")
            self._stop.wait(self.interval)
