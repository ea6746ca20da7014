"""The operator's only door to the API server: the official `kubernetes` client, wrapped thinly.

Objects go in and come out as plain dicts (the shape the builders produce and the tests read).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
from typing import Any, Callable, Mapping

from kubernetes import client
from kubernetes.client.rest import ApiException

from neo_operator import constants as c
from neo_operator.disruption import POLICY_VERSIONS
from neo_operator.events import build_event, condition_changes

log = logging.getLogger(__name__)

APPLIED_HASH_ANNOTATION = f"{c.GROUP}/applied-hash"


def rejection_message(exc: ApiException) -> str:
    """The API server's own explanation of a refused write (its Status message), else the reason."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


def is_spec_rejection(exc: ApiException) -> bool:
    """A 400 (BadRequest) or 422 (Invalid): the object itself is wrong, and so the spec it came from.
    Other errors (403, 409, 5xx) say nothing about the spec and are retried."""
    return exc.status in (400, 422)


def _hash(obj: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Kube:
    """Typed API groups over one ApiClient; every method speaks dicts."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.networking = client.NetworkingV1Api(self.api)
        self._policy_version: str | None = None
        self._events = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="neo-events")

    def _dict(self, obj: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(obj)

    # -- reads ----------------------------------------------------------------------------------
    def list_nodes(self) -> list[dict[str, Any]]:
        # list items come without apiVersion/kind; owner references built from them need both
        return [{"apiVersion": "v1", "kind": "Node", **self._dict(n)} for n in self.core.list_node().items]

    def _read_or_none(self, read: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        """A read that answers None for an object that does not exist (404); other errors raise."""
        try:
            return self._dict(read(*args))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read_or_none(self.core.read_namespaced_persistent_volume_claim, name, namespace)

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read_or_none(self.apps.read_namespaced_deployment, name, namespace)

    def get_neoservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read_or_none(self.custom.get_namespaced_custom_object, c.GROUP, c.VERSION, namespace,
                                  c.PLURAL, name)

    def list_neoservices(self, namespaces: list[str]) -> list[dict[str, Any]]:
        """The NeoServices of ``namespaces`` (all namespaces when empty)."""
        if not namespaces:
            return list(self.custom.list_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL).get("items") or [])
        return [item for ns in namespaces
                for item in self.custom.list_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL).get("items") or []]

    # -- writes ---------------------------------------------------------------------------------
    def _ops(self, kind: str) -> tuple[Callable, Callable, Callable]:
        ops = {
            "ConfigMap": (self.core.read_namespaced_config_map, self.core.create_namespaced_config_map,
                          self.core.replace_namespaced_config_map),
            "Service": (self.core.read_namespaced_service, self.core.create_namespaced_service,
                        self.core.replace_namespaced_service),
            "Deployment": (self.apps.read_namespaced_deployment, self.apps.create_namespaced_deployment,
                           self.apps.replace_namespaced_deployment),
            "NetworkPolicy": (self.networking.read_namespaced_network_policy,
                              self.networking.create_namespaced_network_policy,
                              self.networking.replace_namespaced_network_policy),
        }
        if kind == "PodDisruptionBudget":
            return self._pdb_ops()
        return ops[kind]

    def policy_version(self) -> str:
        """The newest policy/ version the API server serves (v1 from 1.21, v1beta1 before)."""
        if self._policy_version is None:
            groups = {g.name: {v.version for v in g.versions} for g in client.ApisApi(self.api).get_api_versions().groups}
            served = groups.get("policy", set())
            self._policy_version = next((v for v in POLICY_VERSIONS if v in served), POLICY_VERSIONS[0])
        return self._policy_version

    def _pdb_ops(self) -> tuple[Callable, Callable, Callable]:
        """PodDisruptionBudgets through the generic object API: the typed client knows policy/v1 only,
        and 1.20 serves policy/v1beta1 only."""
        version, plural = self.policy_version(), "poddisruptionbudgets"

        def read(name: str, namespace: str) -> Any:
            return self.custom.get_namespaced_custom_object("policy", version, namespace, plural, name)

        def create(namespace: str, body: dict[str, Any], **kw: Any) -> Any:
            return self.custom.create_namespaced_custom_object("policy", version, namespace, plural, body, **kw)

        def replace(name: str, namespace: str, body: dict[str, Any], **kw: Any) -> Any:
            return self.custom.replace_namespaced_custom_object("policy", version, namespace, plural, name, body, **kw)

        return read, create, replace

    def conflicting(self, obj: Mapping[str, Any]) -> str | None:
        """Describes a live object of ``obj``'s kind and name that ``obj``'s controller does not own
        (someone else's); None when the name is free or already ours."""
        kind, meta = obj["kind"], obj["metadata"]
        live = self._read_or_none(self._ops(kind)[0], meta["name"], meta["namespace"])
        if live is None:
            return None
        ours = {ref["uid"] for ref in meta.get("ownerReferences") or [] if ref.get("controller")}
        theirs = {ref.get("uid") for ref in live["metadata"].get("ownerReferences") or [] if ref.get("controller")}
        if ours & theirs:
            return None
        return f"{kind} {meta['namespace']}/{meta['name']}"

    def apply(self, obj: dict[str, Any], dry_run: bool = False, attempts: int = 5) -> str:
        """Create ``obj`` or replace the live object when the desired state changed; returns what it did.

        The desired object's hash is stored on the live one, so an unchanged spec costs one GET and no
        write (and no rollout), and anything the operator owns that someone edited by hand is put back
        on the next change. With ``dry_run`` the API server validates and admits the write (a 4xx
        raises, as for a real one) but persists nothing.

        A race with another writer (a second operator replica, a user deleting the child, the other
        handler of this operator) is retried at once from a fresh read: 409 on create (it appeared),
        409 on replace (it changed) and 404 on replace (it went away) are not errors of the spec.
        """
        for attempt in range(attempts):
            try:
                return self._apply_once(obj, dry_run)
            except ApiException as exc:
                if exc.status not in (404, 409) or attempt == attempts - 1:
                    raise
                log.info("%s %s/%s changed under us (%s); retrying from a fresh read", obj["kind"],
                         obj["metadata"]["namespace"], obj["metadata"]["name"], exc.status)
        raise AssertionError("unreachable")

    def _apply_once(self, obj: dict[str, Any], dry_run: bool) -> str:
        extra = {"dry_run": "All"} if dry_run else {}
        kind, meta = obj["kind"], obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        read, create, replace = self._ops(kind)
        desired = json.loads(json.dumps(obj))
        digest = _hash(desired)
        desired["metadata"].setdefault("annotations", {})[APPLIED_HASH_ANNOTATION] = digest
        try:
            live = self._dict(read(name, namespace))
        except ApiException as exc:
            if exc.status != 404:
                raise
            create(namespace, desired, **extra)
            if not dry_run:
                log.info("created %s %s/%s", kind, namespace, name)
            return "created"
        if (live["metadata"].get("annotations") or {}).get(APPLIED_HASH_ANNOTATION) == digest:
            return "unchanged"
        desired["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        if kind == "Service":
            # allocated by the API server and immutable: carry them over
            for key in ("clusterIP", "clusterIPs", "healthCheckNodePort"):
                if live["spec"].get(key):
                    desired["spec"][key] = live["spec"][key]
            live_ports = {p.get("name"): p for p in live["spec"].get("ports") or []}
            for port in desired["spec"]["ports"]:
                if "nodePort" in live_ports.get(port["name"], {}) and desired["spec"]["type"] != "ClusterIP":
                    port["nodePort"] = live_ports[port["name"]]["nodePort"]
        replace(name, namespace, desired, **extra)
        if not dry_run:
            log.info("updated %s %s/%s", kind, namespace, name)
        return "updated"

    def delete_owned(self, kind: str, namespace: str, name: str, owner_uid: str) -> bool:
        """Delete the ``kind`` object ``name`` if ``owner_uid`` controls it (a child the spec no longer
        wants, e.g. the NetworkPolicy after ``networkPolicy.enabled: false``); True when deleted."""
        live = self._read_or_none(self._ops(kind)[0], name, namespace)
        if live is None or not any(ref.get("uid") == owner_uid and ref.get("controller")
                                   for ref in live["metadata"].get("ownerReferences") or []):
            return False
        delete = {"NetworkPolicy": self.networking.delete_namespaced_network_policy,
                  "PodDisruptionBudget": lambda n, ns: self.custom.delete_namespaced_custom_object(
                      "policy", self.policy_version(), ns, "poddisruptionbudgets", n)}[kind]
        try:
            delete(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        log.info("deleted %s %s/%s", kind, namespace, name)
        return True

    def owned_configmaps(self, namespace: str, selector: str, owner_uid: str) -> list[dict[str, Any]]:
        """The ConfigMaps matching ``selector`` whose controller is ``owner_uid``."""
        items = self.core.list_namespaced_config_map(namespace, label_selector=selector).items
        return [cm for cm in map(self._dict, items)
                if any(ref.get("uid") == owner_uid and ref.get("controller")
                       for ref in cm["metadata"].get("ownerReferences") or [])]

    def delete_configmap(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        log.info("deleted ConfigMap %s/%s (an old configuration)", namespace, name)

    def update_neoservice_status(self, namespace: str, name: str,
                                 compute: Callable[[dict[str, Any]], dict[str, Any] | None], attempts: int = 8) -> bool:
        """Read-modify-write of the status subresource with optimistic concurrency (the reconciler and the
        Deployment follower both write it). ``compute`` gets the fresh object and returns the new status
        (None: nothing to write). Returns False when the NeoService is gone."""
        for _ in range(attempts):
            obj = self.get_neoservice(namespace, name)
            if obj is None:
                return False
            status = compute(obj)
            if status is None or status == obj.get("status"):
                return True
            body = {"apiVersion": c.API_VERSION, "kind": c.KIND,
                    "metadata": {"name": name, "namespace": namespace,
                                 "resourceVersion": obj["metadata"]["resourceVersion"]},
                    "spec": obj["spec"], "status": status}
            try:
                self.custom.replace_namespaced_custom_object_status(c.GROUP, c.VERSION, namespace, c.PLURAL, name, body)
                self.post_condition_events(obj, status)
                return True
            except ApiException as exc:
                if exc.status == 409:
                    continue
                if exc.status == 404:
                    return False
                raise
        raise RuntimeError(f"status of {namespace}/{name} kept conflicting")

    def post_condition_events(self, neo: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        """One Event per condition of ``status`` whose status or reason differs from ``neo``'s recorded
        one, written by a background thread in order: the writes must not slow the reconcile (a probe
        failure is visible only until its Job is replaced) and a refused one is only logged."""
        changes = condition_changes(neo.get("status"), status)
        if changes:
            self._events.submit(self._post_events, dict(neo), changes)

    def _post_events(self, neo: dict[str, Any], changes: list[dict[str, str]]) -> None:
        for cond in changes:
            event = build_event(neo, cond)
            try:
                self.core.create_namespaced_event(event["metadata"]["namespace"], event)
            except ApiException as exc:
                log.warning("could not post the %s event on %s/%s: %s %s", cond["type"],
                            event["metadata"]["namespace"], neo["metadata"]["name"], exc.status, rejection_message(exc))

    # -- bandwidth probe --------------------------------------------------------------------------
    def job_exists(self, namespace: str, name: str) -> bool:
        return self.get_job(namespace, name) is not None

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read_or_none(self.batch.read_namespaced_job, name, namespace)

    def get_node(self, name: str) -> dict[str, Any] | None:
        node = self._read_or_none(self.core.read_node, name)
        return {"apiVersion": "v1", "kind": "Node", **node} if node else None

    def create_job(self, job: dict[str, Any]) -> bool:
        """Create unless it exists; True when created."""
        try:
            self.batch.create_namespaced_job(job["metadata"]["namespace"], job)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return [self._dict(p) for p in self.core.list_namespaced_pod(namespace, label_selector=selector).items]

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def probe_results(self, namespace: str) -> dict[str, str]:
        """The recorded bandwidth probe results (node name -> JSON), {} before the first one."""
        cm = self._read_or_none(self.core.read_namespaced_config_map, c.PROBE_RESULTS_CONFIGMAP, namespace)
        return dict((cm or {}).get("data") or {})

    def record_probe_result(self, namespace: str, node: str, value: str, attempts: int = 8) -> None:
        """Set ``node``'s entry of the probe results ConfigMap (created on first use), with optimistic
        concurrency on the resourceVersion."""
        for _ in range(attempts):
            cm = self._read_or_none(self.core.read_namespaced_config_map, c.PROBE_RESULTS_CONFIGMAP, namespace)
            try:
                if cm is None:
                    self.core.create_namespaced_config_map(namespace, {
                        "metadata": {"name": c.PROBE_RESULTS_CONFIGMAP, "namespace": namespace,
                                     "labels": {c.NAME_LABEL: c.APP_NAME, c.COMPONENT_LABEL: c.PROBE_COMPONENT,
                                                c.MANAGED_BY_LABEL: c.MANAGED_BY}},
                        "data": {node: value}})
                else:
                    cm["data"] = {**(cm.get("data") or {}), node: value}
                    self.core.replace_namespaced_config_map(c.PROBE_RESULTS_CONFIGMAP, namespace, cm)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
        raise RuntimeError(f"ConfigMap {namespace}/{c.PROBE_RESULTS_CONFIGMAP} kept conflicting")
