"""kopf handlers: thin glue from watch events to :mod:`neo_operator.reconcile` and the probe flow.

Importing this module registers the handlers with kopf's default registry (``neo operator`` does).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from typing import Any, Callable, Mapping

import kopf
from kubernetes.client.rest import ApiException

from neo_operator import constants as c
from neo_operator.kube import Kube, rejection_message
from neo_operator.labels import ENGINE_COMPONENT, engine_pod_selector
from neo_operator.model_source import HubSpec
from neo_operator.nodes import bandwidth, is_gpu_node
from neo_operator.nodewatch import NodeChanges, waits_for_nodes, waits_for_probes
from neo_operator.opconfig import OperatorConfig
from neo_operator.probes import ProbeCollector, ensure_probe_jobs
from neo_operator.reconcile import pods_update, reconcile, workload_update
from neo_operator.spec import SpecError, parse_spec

log = logging.getLogger(__name__)

OWNED = {c.MANAGED_BY_LABEL: c.MANAGED_BY}
ENGINE_PODS = {c.MANAGED_BY_LABEL: c.MANAGED_BY, c.COMPONENT_LABEL: ENGINE_COMPONENT}
PEERING_LIFETIME_S = 20  # a replica killed without leaving is taken over this soon
RECREATE_MAX_DELAY_S = 30.0  # the backoff cap of a Deployment recreation that keeps failing


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations under our group: the CRD's status schema is ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    if "config" not in memo:
        memo.config = OperatorConfig.from_args([])
    # A handler that raised (a write lost to a race, a 5xx) is retried this soon, not after kopf's 60 s.
    settings.execution.default_backoff = memo.config.retry_seconds
    # Peering (--peering): one ClusterKopfPeering whatever the watched namespaces (one object in the
    # chart); it must exist, or the replicas would each run standalone and collide. A replica that died
    # without leaving is taken over after its record's lifetime.
    if memo.config.peering:
        settings.peering.clusterwide = True
        settings.peering.mandatory = True
        settings.peering.lifetime = PEERING_LIFETIME_S
    memo.kube = Kube()
    memo.node_changes = NodeChanges()
    memo.pod_locks = {}  # (namespace, NeoService) -> the lock of its pod follower
    memo.collector = ProbeCollector(memo.kube, memo.config, memo.config.retry_seconds,
                                    on_recorded=lambda nodes: _reconcile_all(memo, waits_for_probes,
                                                                             f"probe result of {', '.join(nodes)}"))
    memo.collector.start()


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if "collector" in memo:
        memo.collector.stop()


def _reconcile(body: Mapping[str, Any], memo: kopf.Memo) -> None:
    kube: Kube = memo.kube
    meta = body["metadata"]
    upd = reconcile(kube, memo.config, body)
    kube.update_neoservice_status(meta["namespace"], meta["name"], lambda obj: upd.apply(obj.get("status") or {}))
    if upd.pending:
        raise kopf.TemporaryError(upd.pending, delay=upd.retry_after or memo.config.retry_seconds)


@kopf.on.resume(c.GROUP, c.VERSION, c.PLURAL)
@kopf.on.create(c.GROUP, c.VERSION, c.PLURAL)
@kopf.on.update(c.GROUP, c.VERSION, c.PLURAL, field="spec")
def neoservice_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(body, memo)


@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
async def deployment_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Follow the Deployment's status into the owning NeoService's status; recreate a Deployment
    deleted while its NeoService lives."""
    owner = next((ref for ref in body["metadata"].get("ownerReferences") or []
                  if ref.get("kind") == c.KIND and ref.get("controller")), None)
    if owner is None:
        return
    namespace = body["metadata"]["namespace"]
    if type == "DELETED":
        await _recreate(memo, namespace, owner, body["metadata"]["name"])
        return
    kube: Kube = memo.kube
    upd = workload_update(dict(body), None)
    await asyncio.to_thread(kube.update_neoservice_status, namespace, owner["name"],
                            lambda obj: upd.apply(obj.get("status") or {}))


@kopf.on.event("", "v1", "pods", labels=ENGINE_PODS)
async def engine_pod_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """An engine pod changed: its NeoService's ``PodsInitialized`` follows the init containers of all its
    pods (a model download that keeps failing shows on the NeoService, not only in ``kubectl describe
    pod``; it clears once they finish). The Deployment's status does not change while an init container
    crash-loops, so nothing else would notice."""
    name = (body["metadata"].get("labels") or {}).get(c.INSTANCE_LABEL)
    if name:
        await asyncio.to_thread(_follow_pods, memo, body["metadata"]["namespace"], name)


def _follow_pods(memo: kopf.Memo, namespace: str, name: str) -> None:
    kube: Kube = memo.kube
    # Events of two pods of one NeoService run concurrently: one at a time per NeoService, so a write
    # computed from an older listing never lands after a newer one.
    with memo.pod_locks.setdefault((namespace, name), threading.Lock()):  # setdefault: atomic
        pods = kube.list_pods(namespace, engine_pod_selector(name))
        kube.update_neoservice_status(
            namespace, name, lambda obj: pods_update(pods, _hub(obj, memo.config)).apply(obj.get("status") or {}))


def _hub(neo: Mapping[str, Any], config: OperatorConfig) -> HubSpec | None:
    """The hf:// model of a NeoService (to say what fixes its download), None for other models or a bad spec."""
    try:
        return parse_spec(neo.get("spec") or {}, config.default_images()).model.hub
    except SpecError:
        return None


async def _recreate(memo: kopf.Memo, namespace: str, owner: Mapping[str, Any], deployment: str) -> None:
    """Reconcile the owner again until the Deployment is back or the owner is gone.

    kopf never retries an event handler that raises, and this is the only event that says the
    Deployment is gone: a single failed pass (a 409 from a write racing the spec handler, a 5xx, an
    API server restart) used to leave the NeoService without a Deployment until its next spec change.
    So the pass is retried here, with backoff, without holding a worker thread while it waits.
    """
    kube: Kube = memo.kube
    delay = min(1.0, memo.config.retry_seconds)
    for attempt in itertools.count(1):
        try:
            neo = await asyncio.to_thread(kube.get_neoservice, namespace, owner["name"])
            if neo is None or neo["metadata"].get("deletionTimestamp") or neo["metadata"]["uid"] != owner.get("uid"):
                return  # garbage collection after the NeoService went away
            if attempt == 1:
                log.info("Deployment %s/%s was deleted; recreating it", namespace, deployment)
            await asyncio.to_thread(_reconcile, neo, memo)
            return
        except kopf.TemporaryError:
            return  # waiting for a probe: the NeoService's own handler retries that
        except ApiException as exc:  # the API server's refusal says it all: no traceback per attempt
            log.warning("recreating Deployment %s/%s failed (attempt %d: %s %s); retrying in %.0f s",
                        namespace, deployment, attempt, exc.status, rejection_message(exc), delay)
        except Exception:  # noqa: BLE001 - retried below; the traceback says why
            log.exception("recreating Deployment %s/%s failed (attempt %d); retrying in %.0f s",
                          namespace, deployment, attempt, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECREATE_MAX_DELAY_S)


@kopf.on.event("", "v1", "nodes", labels={c.GPU_PRODUCT_LABEL: kopf.PRESENT})
def gpu_node_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Every GPU node gets one bandwidth probe, until its result is recorded (or set by hand); a node
    that joins or changes what sizing reads wakes the NeoServices that could not be sized."""
    if type == "DELETED" or not is_gpu_node(body):
        memo.node_changes.forget(body["metadata"]["name"])
        return
    gbps, _threads = bandwidth(body, memo.kube.probe_results(memo.config.probe_namespace))
    if gbps is None:
        ensure_probe_jobs(memo.kube, memo.config, [dict(body)])
    # type None: the initial listing at startup, where the resume handlers reconcile everything anyway
    if memo.node_changes.changed(body) and type is not None:
        _reconcile_waiting(memo, body["metadata"]["name"])


def _reconcile_waiting(memo: kopf.Memo, node: str) -> None:
    _reconcile_all(memo, waits_for_nodes, f"node {node} changed")


def _reconcile_all(memo: kopf.Memo, wanted: Callable[[Mapping[str, Any]], bool], why: str) -> None:
    """Reconcile again every watched NeoService ``wanted`` picks (the cluster changed under it)."""
    kube: Kube = memo.kube
    for neo in kube.list_neoservices(list(memo.config.namespace)):
        if not wanted(neo):
            continue
        meta = neo["metadata"]
        log.info("%s; reconciling NeoService %s/%s again", why, meta["namespace"], meta["name"])
        try:
            _reconcile(neo, memo)
        except kopf.TemporaryError:
            pass  # waiting for a probe now: the NeoService's own handler retries that
        except Exception:  # noqa: BLE001 - one NeoService's failure must not starve the others
            log.exception("reconciling %s/%s (%s) failed", meta["namespace"], meta["name"], why)
