"""The NeoService spec as typed values, with the checks the CRD schema cannot express.

The CRD's OpenAPI schema (charts/neo/crds/) rejects wrong types, out-of-range numbers and unknown
enum values at admission time and fills defaults. This module repeats the defaults (so the builders
work on partial specs in unit tests) and checks what a v1.20 schema cannot: cross-field rules such
as "a file-backed model needs a volume" and quantities that must parse.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from kubernetes.utils import parse_quantity

from neo_common.geometry import GEOMETRIES, ModelGeometry
from neo_common.model_source import geometry_from_hf_config
from neo_common.procs import MULTICAST_OFF
from neo_operator import constants as c
from neo_operator.engineargs import EngineArgsError, parse_engine_args
from neo_operator.model_fetch import HF_SCHEME, HubRef
from neo_operator.model_source import HubSpec
from neo_operator.networkpolicy import NetworkPolicySpec, PeerError, check_peers

MODEL_SOURCES = ("dummy", "hf", "gguf")
OFFLOAD_MODES = ("auto", "off", "full", "throughput")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# pod template fields a user may override (merged into the pod spec the operator builds)
# a Secret's name (DNS-1123 subdomain) and a key in its data
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_PERCENT = re.compile(r"^[0-9]+%$")
_ENDPOINT = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
# variables the operator sets on every engine container (multicast off, the caches on the writable volume)
OPERATOR_ENV = frozenset({*MULTICAST_OFF, *c.CACHE_ENV})
DEFAULT_SHUTDOWN_GRACE_S = 30  # the engine's --shutdown-grace-s default
POD_OVERRIDE_FIELDS = ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets",
                       "serviceAccountName", "runtimeClassName", "schedulerName")


class SpecError(ValueError):
    """A spec the operator cannot serve; ``field`` is the spec path, the message says what to change."""

    def __init__(self, field: str, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(f"spec.{field}: {message}")
        self.field = field
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """``spec.model``: ``source`` is the engine's load format (dummy, hf, gguf); ``hub`` is set for an
    hf:// model (downloaded into the pod), else an hf/gguf model is on the PersistentVolumeClaim
    ``claim_name``. ``geometry`` is None until the model-inspection Job read an hf:// model's config.json."""

    source: str
    name: str
    geometry: ModelGeometry | None
    claim_name: str
    path: str
    served_name: str
    max_context: int
    dtype: str
    hub: HubSpec | None = None

    @property
    def on_volume(self) -> bool:
        """Whether the weights come from the PersistentVolumeClaim."""
        return self.source != "dummy" and self.hub is None


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    count: int
    products: tuple[str, ...]
    resource_name: str
    memory_utilization: float
    node_selector: dict[str, str]
    hbm_gbps: float  # 0: from the operator's product table


@dataclasses.dataclass(frozen=True)
class OffloadSpec:
    mode: str
    kv_memory_bytes: int
    cores: int  # 0: derived from the node


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int
    log_level: str


@dataclasses.dataclass(frozen=True)
class ImagesSpec:
    gateway: str
    gpu_worker: str
    cpu_attention: str
    pull_policy: str


@dataclasses.dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclasses.dataclass(frozen=True)
class DisruptionBudgetSpec:
    enabled: bool = True
    max_unavailable: int | str = 1  # a count, or a percentage of the replicas ("25%")


@dataclasses.dataclass(frozen=True)
class NeoServiceSpec:
    """A validated NeoService spec; build it with :func:`parse_spec`."""

    replicas: int
    model: ModelSpec
    gpu: GpuSpec
    offload: OffloadSpec
    engine: EngineSpec
    images: ImagesSpec
    resources: dict[str, dict[str, Any]]
    pod_metadata: dict[str, dict[str, str]]
    pod_spec: dict[str, Any]
    service_type: str
    api_key_secret: SecretKeyRef | None = None
    shutdown_grace_seconds: int = DEFAULT_SHUTDOWN_GRACE_S
    network_policy: NetworkPolicySpec = NetworkPolicySpec()
    env: tuple[dict[str, Any], ...] = ()  # core/v1 EnvVar, for the engine containers
    env_from: tuple[dict[str, Any], ...] = ()  # core/v1 EnvFromSource
    engine_args: tuple[str, ...] = ()  # extra engine flags, checked by the engine's parser
    disruption_budget: DisruptionBudgetSpec = DisruptionBudgetSpec()


def _quantity_bytes(field: str, value: Any) -> int:
    try:
        q = parse_quantity(str(value))
    except ValueError as exc:
        raise SpecError(field, f"{value!r} is not a Kubernetes quantity (e.g. 32Gi): {exc}") from None
    if q < 0:
        raise SpecError(field, f"{value!r} must not be negative")
    return int(q)


def _int(field: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"{value!r} is not an integer")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"within {low}..{high}"
        raise SpecError(field, f"{value} must be {bound}")
    return value


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SpecError(field, f"{value!r} is not one of {', '.join(choices)}")
    return str(value)


def _parse_geometry(raw: Mapping[str, Any], source: str, name: str, hub: HubSpec | None) -> ModelGeometry | None:
    """The geometry to size with: ``model.config`` (the model's config.json fields, any supported
    architecture), ``model.geometry`` (a built-in name), the dummy model's name, or (None) what the
    model-inspection Job reads from an hf:// model's config.json."""
    config = raw.get("config")
    if config is not None:
        if raw.get("geometry"):
            raise SpecError("model.config", "give either spec.model.geometry (a built-in name) or spec.model.config "
                            "(the model's config.json fields), not both")
        if not isinstance(config, Mapping):
            raise SpecError("model.config", "must be an object: the fields of the model's config.json")
        try:
            return geometry_from_hf_config(dict(config), name or "model")
        except KeyError as exc:
            raise SpecError("model.config", f"missing {exc.args[0]!r} (copy the model's config.json fields: "
                            "architectures, hidden_size, num_hidden_layers, num_attention_heads, "
                            "num_key_value_heads, intermediate_size, vocab_size, max_position_embeddings)") from None
        except (ValueError, TypeError) as exc:
            raise SpecError("model.config", str(exc)) from None
    geometry_name = str(raw.get("geometry", "") or (name if source == "dummy" else ""))
    if not geometry_name:
        if hub is not None:
            return None
        raise SpecError("model.geometry", f"a {source} model needs spec.model.geometry, one of "
                        f"{', '.join(sorted(GEOMETRIES))}, or spec.model.config (its config.json fields), so the "
                        "operator can size the KV cache")
    if geometry_name not in GEOMETRIES:
        raise SpecError("model.geometry" if raw.get("geometry") else "model.name",
                        f"unknown model geometry {geometry_name!r}; use one of {', '.join(sorted(GEOMETRIES))}, or "
                        "give the model's config.json fields as spec.model.config",
                        reason="UnknownModel")
    return GEOMETRIES[geometry_name]


def _parse_hub(source: str, raw: Any) -> HubSpec:
    try:
        ref = HubRef.parse(source)
    except ValueError as exc:
        raise SpecError("model.source", str(exc)) from None
    if not isinstance(raw, Mapping):
        raise SpecError("model.hub", "must be an object {tokenSecretRef, endpoint, cacheSize}")
    token = _parse_secret_ref(raw.get("tokenSecretRef"), "model.hub.tokenSecretRef")
    endpoint = str(raw.get("endpoint", "") or "")
    if endpoint and not _ENDPOINT.match(endpoint):
        raise SpecError("model.hub.endpoint", f"{endpoint!r} is not an http(s) URL (e.g. https://huggingface.co or "
                        "a mirror)")
    cache = raw.get("cacheSize", "")
    if cache:
        _quantity_bytes("model.hub.cacheSize", cache)
    return HubSpec(ref=ref, token_secret=token.name if token else "", token_key=token.key if token else "token",
                   endpoint=endpoint.rstrip("/"), cache_size=str(cache or ""))


def check_context(model: ModelSpec) -> None:
    """``maxContext`` within the geometry's positions (once the geometry is known)."""
    g = model.geometry
    if g is not None and model.max_context > g.max_position_embeddings:
        raise SpecError("model.maxContext", f"{model.max_context} exceeds {g.name}'s "
                        f"{g.max_position_embeddings} positions; lower it or set 0 for the model's own")


def _parse_model(raw: Mapping[str, Any]) -> ModelSpec:
    raw_source = raw.get("source", "dummy")
    hub = _parse_hub(raw_source, raw.get("hub") or {}) if isinstance(raw_source, str) \
        and raw_source.startswith(HF_SCHEME) else None
    source = "hf" if hub is not None else _choice("model.source", raw_source, MODEL_SOURCES)
    name = str(raw.get("name", ""))
    geometry = _parse_geometry(raw, source, name or (hub.ref.repo_id if hub else ""), hub)
    volume = raw.get("volume") or {}
    claim = str(volume.get("claimName", ""))
    path = str(volume.get("path", ""))
    if hub is not None and (claim or path):
        raise SpecError("model.volume", "an hf:// model is downloaded into the pod; remove spec.model.volume "
                        "(or use source hf with the model on the volume)")
    if source != "dummy" and hub is None:
        if not claim:
            raise SpecError("model.volume.claimName", f"a {source} model is read from a PersistentVolumeClaim; "
                            "set spec.model.volume.claimName")
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise SpecError("model.volume.path", "set the model's path relative to the volume root "
                            "(e.g. llama-3-8b or models/llama.gguf), without '..'")
        if source == "gguf" and not path.endswith(".gguf"):
            raise SpecError("model.volume.path", f"{path!r}: a gguf model is a file ending in .gguf")
    model = ModelSpec(
        source=source, name=name or (hub.ref.repo_id if hub else geometry.name if geometry else ""),
        geometry=geometry, claim_name=claim, path=path,
        served_name=str(raw.get("servedName", "")), max_context=_int("model.maxContext", raw.get("maxContext", 0), 0),
        dtype=_choice("model.dtype", raw.get("dtype", "auto"), DTYPES), hub=hub,
    )
    check_context(model)
    return model


def _parse_gpu(raw: Mapping[str, Any]) -> GpuSpec:
    util = raw.get("memoryUtilization", 0.9)
    if not isinstance(util, (int, float)) or not 0.05 <= float(util) <= 1.0:
        raise SpecError("gpu.memoryUtilization", f"{util!r} must be within [0.05, 1.0]")
    hbm = raw.get("memoryBandwidthGBps", 0)
    if not isinstance(hbm, (int, float)) or hbm < 0:
        raise SpecError("gpu.memoryBandwidthGBps", f"{hbm!r} must be a number >= 0")
    selector = raw.get("nodeSelector") or {}
    return GpuSpec(
        count=_int("gpu.count", raw.get("count", 1), 1, 16),
        products=tuple(str(p) for p in raw.get("products") or ()),
        resource_name=str(raw.get("resourceName", "nvidia.com/gpu")),
        memory_utilization=float(util),
        node_selector={str(k): str(v) for k, v in selector.items()},
        hbm_gbps=float(hbm),
    )


def _parse_offload(raw: Mapping[str, Any]) -> OffloadSpec:
    mode = _choice("cpuOffload.mode", raw.get("mode", "auto"), OFFLOAD_MODES)
    kv = _quantity_bytes("cpuOffload.kvMemory", raw.get("kvMemory", "8Gi"))
    if mode != "off" and kv == 0:
        raise SpecError("cpuOffload.kvMemory", f"mode {mode} needs host KV memory; set kvMemory (e.g. 16Gi) "
                        "or mode off")
    return OffloadSpec(mode=mode, kv_memory_bytes=kv, cores=_int("cpuOffload.cores", raw.get("cores", 0), 0, 512))


def _parse_engine(raw: Mapping[str, Any]) -> EngineSpec:
    block = raw.get("blockSize", 16)
    if block not in (8, 16, 32):
        raise SpecError("engine.blockSize", f"{block!r} must be 8, 16 or 32")
    return EngineSpec(
        block_size=block,
        max_num_seqs=_int("engine.maxNumSeqs", raw.get("maxNumSeqs", 256), 1, 4096),
        max_num_batched_tokens=_int("engine.maxNumBatchedTokens", raw.get("maxNumBatchedTokens", 2048), 16),
        max_waiting=_int("engine.maxWaiting", raw.get("maxWaiting", 4096), 1),
        log_level=_choice("engine.logLevel", raw.get("logLevel", "info"), ("debug", "info", "warning", "error")),
    )


def _parse_secret_ref(raw: Any, field: str = "apiKeySecretRef") -> SecretKeyRef | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise SpecError(field, "must be an object {name, key} naming a Secret in this namespace")
    name, key = raw.get("name", ""), raw.get("key", "")
    if not isinstance(name, str) or len(name) > 253 or not _SECRET_NAME.match(name):
        raise SpecError(f"{field}.name", f"{name!r} is not a Secret name (lowercase DNS subdomain)")
    if not isinstance(key, str) or len(key) > 253 or not _SECRET_KEY.match(key):
        raise SpecError(f"{field}.key", f"{key!r} is not a Secret key (letters, digits, '-', '_', '.')")
    return SecretKeyRef(name=name, key=key)


def _parse_network_policy(raw: Any) -> NetworkPolicySpec:
    if not isinstance(raw, Mapping):
        raise SpecError("networkPolicy", "must be an object {enabled, from, metricsFrom}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise SpecError("networkPolicy.enabled", f"{enabled!r} is not true or false")
    peers: dict[str, tuple[dict[str, Any], ...] | None] = {}
    for field in ("from", "metricsFrom"):
        if raw.get(field) is None:
            peers[field] = None
            continue
        try:
            peers[field] = check_peers("", raw[field])
        except PeerError as exc:
            raise SpecError(f"networkPolicy.{field}", str(exc).strip()) from None
        if field == "from" and not peers[field]:
            # an ingress rule without peers admits every source: never the meaning of an empty list here
            raise SpecError("networkPolicy.from", "an empty list would admit every source; name at least one peer, "
                            "leave it out (this namespace only) or set networkPolicy.enabled false")
    return NetworkPolicySpec(enabled=enabled, from_peers=peers["from"], metrics_peers=peers["metricsFrom"])


def _parse_env(raw: Any, operator_env: frozenset[str]) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list):
        raise SpecError("env", "must be a list of {name, value} or {name, valueFrom}")
    for i, var in enumerate(raw):
        name = var.get("name") if isinstance(var, Mapping) else None
        if not isinstance(name, str) or not name:
            raise SpecError(f"env[{i}].name", "every variable needs a name")
        if name.startswith("NEO_"):
            # the engine's settings live in its ConfigMap, decided or checked by the operator
            raise SpecError(f"env[{i}].name", f"{name}: engine settings go through spec.engineArgs (checked "
                            "against the engine's flags), or the spec field that sets them")
        if name in operator_env:
            raise SpecError(f"env[{i}].name", f"{name} is set by the operator (the pod's read-only root "
                            "filesystem needs it); remove it")
    return tuple(dict(var) for var in raw)


def _parse_env_from(raw: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(raw, list) or not all(isinstance(src, Mapping) for src in raw):
        raise SpecError("envFrom", "must be a list of {configMapRef} or {secretRef} (with an optional prefix)")
    return tuple(dict(src) for src in raw)


def _parse_engine_args(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(arg, str) for arg in raw):
        raise SpecError("engineArgs", "must be a list of strings, e.g. [\"--enable-prefix-caching\", \"false\"]")
    try:
        parse_engine_args(raw)
    except EngineArgsError as exc:
        raise SpecError("engineArgs", str(exc)) from None
    return tuple(raw)


def _parse_disruption_budget(raw: Any) -> DisruptionBudgetSpec:
    if not isinstance(raw, Mapping):
        raise SpecError("disruptionBudget", "must be an object {enabled, maxUnavailable}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise SpecError("disruptionBudget.enabled", f"{enabled!r} is not true or false")
    value = raw.get("maxUnavailable", 1)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, str):
        if not _PERCENT.match(value) or int(value[:-1]) > 100:
            raise SpecError("disruptionBudget.maxUnavailable", f"{value!r} is neither a count nor a percentage "
                            "(0%..100%)")
    else:
        value = _int("disruptionBudget.maxUnavailable", value, 0)
    return DisruptionBudgetSpec(enabled=enabled, max_unavailable=value)


def parse_spec(raw: Mapping[str, Any], default_images: Mapping[str, str]) -> NeoServiceSpec:
    """Validate a NeoService ``spec`` dict; raises :class:`SpecError` naming the field to fix."""
    if not isinstance(raw, Mapping):
        raise SpecError("", "spec must be an object")
    images = raw.get("images") or {}
    resolved = {key: str(images.get(key) or default_images.get(key, "")) for key in ("gateway", "gpuWorker", "cpuAttention")}
    for key, image in resolved.items():
        if not image:
            raise SpecError(f"images.{key}", "no image given and the operator has no default; set it")
    template = raw.get("podTemplate") or {}
    meta = template.get("metadata") or {}
    pod_spec = dict(template.get("spec") or {})
    unknown = sorted(set(pod_spec) - set(POD_OVERRIDE_FIELDS))
    if unknown:
        raise SpecError("podTemplate.spec", f"cannot override {', '.join(unknown)}; "
                        f"allowed: {', '.join(POD_OVERRIDE_FIELDS)}")
    resources = raw.get("resources") or {}
    for key in resources:
        if key not in ("gateway", "gpuWorker", "cpuAttention"):
            raise SpecError(f"resources.{key}", "resources are set per container: gateway, gpuWorker, cpuAttention")
    service = raw.get("service") or {}
    return NeoServiceSpec(
        replicas=_int("replicas", raw.get("replicas", 1), 0, 1000),
        model=_parse_model(raw.get("model") or {}),
        gpu=_parse_gpu(raw.get("gpu") or {}),
        offload=_parse_offload(raw.get("cpuOffload") or {}),
        engine=_parse_engine(raw.get("engine") or {}),
        images=ImagesSpec(gateway=resolved["gateway"], gpu_worker=resolved["gpuWorker"],
                          cpu_attention=resolved["cpuAttention"],
                          pull_policy=_choice("images.pullPolicy", images.get("pullPolicy", "IfNotPresent"),
                                              ("Always", "IfNotPresent", "Never"))),
        resources={k: dict(v or {}) for k, v in resources.items()},
        pod_metadata={"labels": dict(meta.get("labels") or {}), "annotations": dict(meta.get("annotations") or {})},
        pod_spec=pod_spec,
        service_type=_choice("service.type", service.get("type", "ClusterIP"), ("ClusterIP", "NodePort", "LoadBalancer")),
        api_key_secret=_parse_secret_ref(raw.get("apiKeySecretRef")),
        shutdown_grace_seconds=_int("shutdownGraceSeconds", raw.get("shutdownGraceSeconds", DEFAULT_SHUTDOWN_GRACE_S),
                                    0, 3600),
        network_policy=_parse_network_policy(raw.get("networkPolicy") or {}),
        env=_parse_env(raw.get("env") or [], OPERATOR_ENV),
        env_from=_parse_env_from(raw.get("envFrom") or []),
        engine_args=_parse_engine_args(raw.get("engineArgs") or []),
        disruption_budget=_parse_disruption_budget(raw.get("disruptionBudget") or {}),
    )
