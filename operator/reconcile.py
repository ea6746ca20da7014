"""One reconcile pass of a NeoService: validate, size, build the children, apply them, report.

Everything that can fail for a reason the user can fix (spec, model, nodes, sizing) is decided
before the first child is written, so a bad spec never leaves half-built children; it leaves a
condition that says what to change.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import kopf
from kubernetes.client.rest import ApiException

from neo_common.geometry import ModelGeometry

from neo_operator import constants as c
from neo_operator import model_inspection as mi
from neo_operator import status as st
from neo_operator.configmap import build_configmap, config_hash, configmaps_to_prune
from neo_operator.deployment import build_deployment
from neo_operator.disruption import build_disruption_budget, disruption_budget_name
from neo_operator.engineargs import EngineArgsError
from neo_operator.kube import Kube, is_spec_rejection, rejection_message
from neo_operator.labels import engine_pod_selector, selector_string
from neo_operator.networkpolicy import build_network_policy, network_policy_name
from neo_operator.nodes import node_facts, select_nodes
from neo_operator.opconfig import OperatorConfig
from neo_operator.podhealth import CONDITION as PODS_INITIALIZED, pods_condition
from neo_operator.probes import ensure_probe_jobs, probe_failures
from neo_operator.service import build_service, service_url
from neo_operator.sizing import SizingError, SizingPending, size
from neo_operator.spec import NeoServiceSpec, SpecError, check_context, parse_spec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StatusUpdate:
    """Conditions and fields one pass decided, applied onto the freshest status at write time."""

    generation: int | None
    conditions: list[tuple[str, bool, str, str]] = dataclasses.field(default_factory=list)
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    pending: str | None = None  # set when the pass must be retried later (waiting for a probe)
    retry_after: float | None = None  # seconds until that retry (None: --retry-seconds)

    def cond(self, type_: str, ok: bool, reason: str, message: str) -> "StatusUpdate":
        self.conditions.append((type_, ok, reason, message))
        return self

    def apply(self, current: Mapping[str, Any]) -> dict[str, Any]:
        status = dict(current or {})
        conds = list(status.get("conditions") or [])
        for type_, ok, reason, message in self.conditions:
            conds = st.set_condition(conds, type_, ok, reason, message, self.generation)
        status["conditions"] = conds
        status.update(self.fields)
        if self.generation is not None:
            status["observedGeneration"] = self.generation
        return st.derive(status, self.generation)


def pods_update(pods: list[dict[str, Any]], hub: Any) -> StatusUpdate:
    """``PodsInitialized`` from the engine pods (the pod watch: says nothing about the spec's generation)."""
    return StatusUpdate(generation=None).cond(PODS_INITIALIZED, *pods_condition(pods, hub))


def workload_update(deployment: Mapping[str, Any] | None, generation: int | None) -> StatusUpdate:
    ok, reason, message, replicas, ready = st.workload_condition(deployment)
    upd = StatusUpdate(generation=None)  # following the Deployment does not mean the spec was observed
    upd.cond("WorkloadReady", ok, reason, message)
    upd.fields.update({"replicas": replicas, "readyReplicas": ready})
    return upd


def reconcile(kube: Kube, config: OperatorConfig, body: Mapping[str, Any],
              adopt: Callable[[list[dict[str, Any]], Mapping[str, Any]], None] | None = None) -> StatusUpdate:
    """Bring the children of the NeoService ``body`` to its spec; returns the status to record."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    upd = StatusUpdate(generation=meta.get("generation"))
    try:
        spec = parse_spec(body.get("spec") or {}, config.default_images())
    except SpecError as exc:
        return upd.cond("SpecValid", False, exc.reason, str(exc))
    upd.cond("SpecValid", True, "Valid", "spec accepted")

    if spec.model.hub is not None:
        resolved = _hub_model(kube, config, body, spec, upd, adopt or _kopf_adopt)
        if resolved is None:
            return upd
        spec = resolved
    elif spec.model.on_volume and kube.get_pvc(namespace, spec.model.claim_name) is None:
        return upd.cond("ModelAvailable", False, "ModelMissing",
                        f"PersistentVolumeClaim {spec.model.claim_name!r} not found in namespace {namespace}; create it "
                        f"with the model at {spec.model.path!r}, or fix spec.model.volume.claimName")
    else:
        upd.cond("ModelAvailable", True, "Found", "dummy weights" if spec.model.source == "dummy"
                 else f"{spec.model.source} model on PersistentVolumeClaim {spec.model.claim_name}")

    selection = select_nodes(kube.list_nodes(), spec.gpu.products, spec.gpu.node_selector)
    nodes = selection.nodes
    probe_results = kube.probe_results(config.probe_namespace)
    try:
        decision = size(spec, [node_facts(n, spec.gpu.resource_name, probe_results) for n in nodes], config.node_reserve)
    except SizingPending as exc:
        ensure_probe_jobs(kube, config, [n for n in nodes if n["metadata"]["name"] in exc.nodes])
        upd.pending = str(exc)
        failures = probe_failures(kube, config.probe_namespace, exc.nodes)
        if failures:
            return upd.cond("Sized", False, "BandwidthProbeFailed",
                            "; ".join(f.describe(config.retry_seconds) for f in failures.values())
                            + f"; an administrator may set the node annotation {c.READ_GBPS_ANNOTATION} by hand, or "
                            "set spec.cpuOffload.mode to off or full to size without it")
        return upd.cond("Sized", False, "BandwidthProbePending",
                        f"{exc}; the probe Job in namespace {config.probe_namespace} records each node's result "
                        f"in ConfigMap {c.PROBE_RESULTS_CONFIGMAP} (an administrator may instead set the node "
                        f"annotation {c.READ_GBPS_ANNOTATION} by hand), or set spec.cpuOffload.mode to off or full "
                        "to size without it")
    except SizingError as exc:
        return upd.cond("Sized", False, exc.reason, exc.message + selection.note())
    if decision.probes_pending:
        ensure_probe_jobs(kube, config, [n for n in nodes if n["metadata"]["name"] in decision.probes_pending])
    upd.cond("Sized", True, "Sized", decision.reason + selection.note())

    try:
        configmap = build_configmap(name, spec, decision, upd.generation)
    except EngineArgsError as exc:  # flags that parse alone but not with what the operator decided
        return upd.cond("SpecValid", False, "InvalidSpec", f"spec.engineArgs: {exc}")
    deployment = build_deployment(name, spec, decision, config_hash(configmap["data"]))
    service = build_service(name, spec)
    children = [configmap, service, deployment]
    if spec.network_policy.enabled:
        children.append(build_network_policy(name, spec.network_policy, config.default_metrics_peers))
    if spec.disruption_budget.enabled:
        children.append(build_disruption_budget(name, spec.disruption_budget, kube.policy_version()))
    (adopt or _kopf_adopt)(children, body)
    taken = [what for child in children if (what := kube.conflicting(child))]
    if taken:
        return upd.cond("SpecValid", False, "NameConflict",
                        f"{', '.join(taken)} already exist(s) and belong(s) to something else; rename this "
                        "NeoService or remove them")
    # Every child through a server-side dry run first: whatever the API server would refuse (a name
    # its naming rules reject, a bad quantity, toleration or label in the pass-through fields)
    # becomes a condition before anything is written, never a half-built set of children.
    for child in children:
        try:
            kube.apply(child, dry_run=True)
        except ApiException as exc:
            if not is_spec_rejection(exc):
                raise
            return upd.cond("SpecValid", False, "RejectedByApiServer",
                            f"the API server refuses the {child['kind']} {child['metadata']['name']!r} this spec "
                            f"makes: {rejection_message(exc)}; fix the spec (nothing was written)")
    for child in children:  # ConfigMap first: the pods read it at start
        kube.apply(child)
    if not spec.network_policy.enabled:
        kube.delete_owned("NetworkPolicy", namespace, network_policy_name(name), meta["uid"])
    if not spec.disruption_budget.enabled:
        kube.delete_owned("PodDisruptionBudget", namespace, disruption_budget_name(name), meta["uid"])
    _prune_configmaps(kube, namespace, name, meta["uid"], configmap["metadata"]["name"])

    upd.fields.update({
        "sizing": decision.to_status(),
        "gpu": st.gpu_summary(spec.gpu.count, decision.gpu_products),
        "offload": f"{decision.offload_mode} ({decision.cpu_kv_blocks} CPU blocks)" if decision.offload else "off",
        "url": service_url(name, namespace),
        "selector": selector_string(name),
    })
    upd.cond(PODS_INITIALIZED, *pods_condition(kube.list_pods(namespace, engine_pod_selector(name)), spec.model.hub))
    follow = workload_update(kube.get_deployment(namespace, name), upd.generation)
    upd.conditions += follow.conditions
    upd.fields.update(follow.fields)
    return upd


def _hub_model(kube: Kube, config: OperatorConfig, body: Mapping[str, Any], spec: NeoServiceSpec, upd: StatusUpdate,
               adopt: Callable[[list[dict[str, Any]], Mapping[str, Any]], None]) -> NeoServiceSpec | None:
    """The spec with the hf:// model's commit and geometry, from ``status.model`` or the model-inspection
    Job (created here when needed); None when the pass stops here (the Job runs, or it failed: the
    condition in ``upd`` says which)."""
    meta = body["metadata"]
    hub = spec.model.hub
    assert hub is not None
    rec = mi.recorded(body.get("status"), hub)
    job_name = mi.inspection_job_name(meta["name"], hub)
    if rec is None:
        job = kube.get_job(meta["namespace"], job_name)
        state = mi.inspection_state(job, kube.list_pods(meta["namespace"], f"job-name={job_name}") if job else [])
        if state.result is not None:
            rec = mi.status_record(hub, state.result)
        elif state.failure is not None and not state.failure.retrying:
            wait = mi.retry_due(state.failure, config.retry_seconds)
            if wait > 0:
                upd.pending, upd.retry_after = "model inspection failed", wait
                return _model_failed(upd, state.failure, hub, config)
            kube.delete_job(meta["namespace"], job_name)
            _start_inspection(kube, body, spec, state.failure.attempt + 1, state.failure, adopt)
            upd.pending = "model inspection retried"
            return _model_failed(upd, dataclasses.replace(state.failure, retrying=True), hub, config)
        else:
            if job is None:
                _start_inspection(kube, body, spec, 1, None, adopt)
            upd.pending = "waiting for the model inspection"
            if state.failure is not None:  # a replacement runs; it carries why the last one failed
                return _model_failed(upd, state.failure, hub, config)
            upd.cond("ModelAvailable", False, "Inspecting", f"Job {job_name} is reading the config.json of "
                     f"{hub.ref.uri} (its commit and geometry) before anything is sized")
            return None
    if kube.get_job(meta["namespace"], job_name) is not None:
        kube.delete_job(meta["namespace"], job_name)
    upd.fields["model"] = rec
    geometry = spec.model.geometry or ModelGeometry.from_dict(rec["geometry"])
    model = dataclasses.replace(spec.model, geometry=geometry,
                                hub=dataclasses.replace(hub, resolved=rec["revision"]))
    try:
        check_context(model)
    except SpecError as exc:
        upd.cond("SpecValid", False, exc.reason, str(exc))
        return None
    upd.cond("ModelAvailable", True, "Found", f"{hub.ref.uri} is commit {rec['revision']} ({geometry.architecture}, "
             f"{geometry.num_layers} layers); each pod downloads it into its model volume")
    return dataclasses.replace(spec, model=model)


def _model_failed(upd: StatusUpdate, failure: mi.InspectionFailure, hub: Any, config: OperatorConfig) -> None:
    upd.cond("ModelAvailable", False, failure.reason, mi.describe(failure, hub, config.retry_seconds))
    return None


def _start_inspection(kube: Kube, body: Mapping[str, Any], spec: NeoServiceSpec, attempt: int,
                      last: mi.InspectionFailure | None,
                      adopt: Callable[[list[dict[str, Any]], Mapping[str, Any]], None]) -> None:
    pull = list(spec.pod_spec.get("imagePullSecrets") or [])
    job = mi.build_inspection_job(body["metadata"]["name"], body["metadata"]["namespace"], spec.model.hub,
                                  spec.images.gateway, spec.images.pull_policy, pull, attempt, last)
    adopt([job], body)
    kube.create_job(job)


def _prune_configmaps(kube: Kube, namespace: str, name: str, uid: str, current: str) -> None:
    """Delete the configurations too old to roll back to; never the one the live pod template names
    (after a ``kubectl rollout undo`` that is an older one)."""
    owned = kube.owned_configmaps(namespace, f"{selector_string(name)},{c.COMPONENT_LABEL}=config", uid)
    live = kube.get_deployment(namespace, name)
    keep = {current} | {src["configMapRef"]["name"]
                        for ct in ((live or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [])
                        for src in ct.get("envFrom") or [] if src.get("configMapRef")}
    for old in configmaps_to_prune(owned, keep):
        kube.delete_configmap(namespace, old)


def _kopf_adopt(children: list[dict[str, Any]], owner: Mapping[str, Any]) -> None:
    """Owner reference (for garbage collection), the owner's namespace, and the owner's labels."""
    kopf.adopt(children, owner=dict(owner))
