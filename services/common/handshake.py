"""What a ``WorkerReady`` must say before the gateway believes it (docs/design.md, "The process link").

A worker's Ready decides the gateway's block pools, context limit and sampling vocabulary, so one
that does not fit this replica's configuration (another version's worker, a worker started with
other flags, a forged frame) is refused with the first mismatch named, instead of being adopted.
"""

from __future__ import annotations

from neo_common.config import NeoConfig
from neo_common.geometry import ModelGeometry
from neo_common.protocol import WorkerKind, WorkerReady

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
HOST_KV_DTYPES = ("bfloat16", "float16")   # what the CPU attention kernel reads


def _int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_common(ready: WorkerReady, config: NeoConfig, kind: WorkerKind) -> str | None:
    """What every worker's Ready must say: its kind, a real pid, the configured block size."""
    if ready.kind != kind:
        return f"kind {ready.kind} is not a {kind.name.lower()}"
    if not _int(ready.pid, 1):
        return f"pid {ready.pid!r}"
    if ready.block_size != config.cache.block_size:
        return f"block_size {ready.block_size!r} != --block-size {config.cache.block_size}"
    return None


def check_gpu_worker_ready(ready: WorkerReady, config: NeoConfig) -> str | None:
    """None if ``ready`` fits ``config``, else what does not."""
    why = _check_common(ready, config, WorkerKind.GPU_WORKER)
    if why:
        return why
    if not _int(ready.num_gpu_blocks, 1):
        return f"num_gpu_blocks {ready.num_gpu_blocks!r}"
    if config.cache.num_gpu_blocks and ready.num_gpu_blocks != config.cache.num_gpu_blocks:
        return f"num_gpu_blocks {ready.num_gpu_blocks} != --num-gpu-blocks {config.cache.num_gpu_blocks}"
    geometry = ready.geometry
    if not isinstance(geometry, ModelGeometry):
        return "geometry missing"
    if not _int(geometry.vocab_size, 1) or not _int(geometry.num_layers, 1):
        return "geometry: vocab_size and num_layers must be positive integers"
    if not _int(ready.max_model_len, 1) or ready.max_model_len > geometry.max_position_embeddings:
        return f"max_model_len {ready.max_model_len!r} (the model's context is {geometry.max_position_embeddings})"
    if config.model.max_model_len and ready.max_model_len != config.model.max_model_len:
        return f"max_model_len {ready.max_model_len} != --max-model-len {config.model.max_model_len}"
    if ready.dtype not in COMPUTE_DTYPES or config.model.dtype not in ("auto", ready.dtype):
        return f"dtype {ready.dtype!r} (configured --dtype {config.model.dtype})"
    if ready.kv_dtype != config.cache.resolve_kv_dtype(ready.dtype, config.offload_enabled):
        return f"kv_dtype {ready.kv_dtype!r} does not follow --kv-cache-dtype {config.cache.kv_cache_dtype}"
    if config.offload_enabled:
        if not _int(ready.num_cpu_blocks, 1):
            return f"num_cpu_blocks {ready.num_cpu_blocks!r}: offloading needs a host pool"
        if config.cache.num_cpu_blocks and ready.num_cpu_blocks != config.cache.num_cpu_blocks:
            return f"num_cpu_blocks {ready.num_cpu_blocks} != --num-cpu-blocks {config.cache.num_cpu_blocks}"
        if ready.cost_tables is None:
            return "cost_tables missing: offloading plans with them"
    elif ready.num_cpu_blocks != 0:
        return f"num_cpu_blocks {ready.num_cpu_blocks!r} with --offload-mode off"
    return None


def check_cpu_attention_ready(ready: WorkerReady, config: NeoConfig) -> str | None:
    """None if a cpu_attention process's ``ready`` fits ``config``, else what does not."""
    why = _check_common(ready, config, WorkerKind.CPU_ATTENTION)
    if why:
        return why
    if ready.dtype not in HOST_KV_DTYPES:
        return f"dtype {ready.dtype!r}: the host pool holds bfloat16 or float16"
    return None
