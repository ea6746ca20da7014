"""Names the operator, its CRD, its children and the tests agree on."""

from __future__ import annotations

GROUP = "neo.serving.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "NeoService"
PLURAL = "neoservices"

# Labels every child carries (the selector uses NAME_LABEL + INSTANCE_LABEL).
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "neo-operator"
APP_NAME = "neo"
SERVICE_LABEL = f"{GROUP}/service"

# Pod template annotation holding the ConfigMap's hash, so a config change rolls the pods.
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"

# Node annotations an administrator may set by hand (clusters that cannot run the probe); they win
# over a probe result. The operator itself never writes Nodes.
READ_GBPS_ANNOTATION = f"{GROUP}/host-read-gbps"
PROBE_RESULT_ANNOTATION = f"{GROUP}/bandwidth-probe"
# The bandwidth probe results: one ConfigMap in the operator's namespace, one key per node name,
# each value the probe's JSON line (plus when it was measured).
PROBE_RESULTS_CONFIGMAP = "neo-bandwidth-probes"
PROBE_COMPONENT = "bandwidth-probe"
PROBE_NODE_LABEL = f"{GROUP}/probe-node"
PROBE_ATTEMPT_ANNOTATION = f"{GROUP}/probe-attempt"  # 1 for the first Job of a node, +1 per replacement
PROBE_LAST_FAILURE_ANNOTATION = f"{GROUP}/probe-last-failure"  # on a replacement Job: why the last one failed (JSON)

# GPU Feature Discovery labels.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB per GPU
GPU_COUNT_LABEL = "nvidia.com/gpu.count"

GATEWAY_PORT = 8000
SHM_PATH = "/dev/shm"
MODEL_MOUNT = "/models"
# The pod's private link volume: the gateway binds its ipc:// sockets (and keeps the link keys) in
# RUNTIME_DIR, which the processes create 0700 inside this memory-backed emptyDir.
RUNTIME_MOUNT = "/run/neo"
RUNTIME_DIR = f"{RUNTIME_MOUNT}/link"
# The root filesystem is read-only: scratch space and every cache (cost tables, Triton, torch
# inductor, Hugging Face, CUDA's JIT cache under $HOME) live in emptyDirs.
TMP_MOUNT = "/tmp"
CACHE_MOUNT = "/var/cache/neo"

# Where the processes and their libraries write, all inside the cache emptyDir.
CACHE_ENV = {
    "HOME": CACHE_MOUNT,  # ~/.triton, ~/.nv (CUDA's JIT cache), anything else keyed on $HOME
    "XDG_CACHE_HOME": CACHE_MOUNT,
    "NEO_COST_CACHE_DIR": f"{CACHE_MOUNT}/neo/cost",
    "TRITON_CACHE_DIR": f"{CACHE_MOUNT}/triton",
    "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_MOUNT}/inductor",
    "HF_HOME": f"{CACHE_MOUNT}/huggingface",
}
