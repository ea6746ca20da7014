"""The engine-config ConfigMap: ``NEO_*`` variables every container reads with ``envFrom``.

The names come from :meth:`neo_common.config.NeoConfig.to_env`, so the config dataclasses stay the only
place that knows them.

Each configuration is its own immutable ConfigMap, ``<name>-config-<hash of its data>``, which the pod
template names: a change makes a new ConfigMap and a new template (so the pods roll), the old pods keep
reading the configuration they started with, and ``kubectl rollout undo`` brings back a template that
names the previous ConfigMap, which still exists (the newest KEPT_CONFIGMAPS are kept).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from neo_common.config import (CacheConfig, DeviceConfig, HttpConfig, IpcConfig, ModelConfig, NeoConfig,
                               SchedulerConfig)
from neo_common.enums import OffloadMode
from neo_operator import constants as c
from neo_operator.engineargs import apply_engine_args
from neo_operator.labels import child_labels
from neo_operator.sizing import SizingDecision
from neo_operator.spec import NeoServiceSpec


# Never in the ConfigMap: the API key comes from its Secret (gateway env), and the link addresses are
# left to the engine's default, ipc:// sockets in NEO_RUNTIME_DIR (a tcp:// address would put the
# link on the pod's network).
OMITTED_ENV = ("NEO_API_KEY", "NEO_WORKER_ADDR", "NEO_CPU_ATTENTION_ADDR")


# ConfigMaps kept per NeoService (the current one included), so a rollback finds its configuration;
# the Deployment keeps as many revisions (revisionHistoryLimit = KEPT_CONFIGMAPS - 1 old ones).
KEPT_CONFIGMAPS = 3
HASH_CHARS = 10  # of the data's SHA-256 in the name: a collision would need 2^20 configurations
# The NeoService generation that last wanted this configuration: orders them for pruning (a
# configuration wanted again after a detour counts as new).
GENERATION_ANNOTATION = f"{c.GROUP}/generation"


def configmap_name(name: str, data_hash: str) -> str:
    return f"{name}-config-{data_hash[:HASH_CHARS]}"


def model_path(spec: NeoServiceSpec) -> str:
    if spec.model.source == "dummy":
        return spec.model.geometry.name
    if spec.model.hub is not None:
        return spec.model.hub.model_dir
    return f"{c.MODEL_MOUNT}/{spec.model.path}"


def engine_config(spec: NeoServiceSpec, decision: SizingDecision) -> NeoConfig:
    """What the operator decides, with ``spec.engineArgs`` over it (raises EngineArgsError when the
    engine refuses the combination)."""
    return apply_engine_args(_decided_config(spec, decision), spec.engine_args)


def _decided_config(spec: NeoServiceSpec, decision: SizingDecision) -> NeoConfig:
    return NeoConfig(
        model=ModelConfig(model=model_path(spec), load_format=spec.model.source, dtype=spec.model.dtype,
                          served_model_name=spec.model.served_name, max_model_len=spec.model.max_context),
        cache=CacheConfig(block_size=decision.block_size, num_gpu_blocks=decision.gpu_kv_blocks,
                          gpu_memory_utilization=spec.gpu.memory_utilization,
                          num_cpu_blocks=decision.cpu_kv_blocks),
        scheduler=SchedulerConfig(max_num_seqs=spec.engine.max_num_seqs,
                                  max_num_batched_tokens=spec.engine.max_num_batched_tokens,
                                  max_waiting=spec.engine.max_waiting, offload_mode=OffloadMode(decision.offload_mode)),
        device=DeviceConfig(device="cuda", cpu_threads=decision.cpu_attention_threads,
                            tensor_parallel_size=decision.tensor_parallel_size),
        # The workers reach the gateway over ipc:// sockets in the pod's private runtime volume; only
        # HTTP listens on the network.
        ipc=IpcConfig(runtime_dir=c.RUNTIME_DIR),
        http=HttpConfig(host="0.0.0.0", port=c.GATEWAY_PORT, log_level=spec.engine.log_level,
                        shutdown_grace_s=float(spec.shutdown_grace_seconds)),
    )


def config_hash(data: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def build_configmap(name: str, spec: NeoServiceSpec, decision: SizingDecision,
                    generation: int | None = None) -> dict[str, Any]:
    data = {k: v for k, v in engine_config(spec, decision).to_env().items() if k not in OMITTED_ENV}
    meta: dict[str, Any] = {"name": configmap_name(name, config_hash(data)), "labels": child_labels(name, "config")}
    if generation is not None:
        meta["annotations"] = {GENERATION_ANNOTATION: str(generation)}
    # immutable: the kubelet stops watching it, and nobody (the operator included) can change what a
    # running pod's configuration was; a new configuration is a new ConfigMap
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data, "immutable": True}


def configmaps_to_prune(configmaps: list[Mapping[str, Any]], keep: set[str],
                        count: int = KEPT_CONFIGMAPS) -> list[str]:
    """Names of the ConfigMaps of one NeoService to delete: all but the ``count`` most recently wanted
    ones (by generation, then creation time) and those in ``keep`` (what the live pod template names)."""
    def recency(cm: Mapping[str, Any]) -> tuple[int, str]:
        meta = cm["metadata"]
        generation = (meta.get("annotations") or {}).get(GENERATION_ANNOTATION, "0")
        return (int(generation) if generation.isdigit() else 0, str(meta.get("creationTimestamp") or ""))

    ordered = sorted(configmaps, key=recency, reverse=True)
    return [cm["metadata"]["name"] for cm in ordered[count:] if cm["metadata"]["name"] not in keep]
