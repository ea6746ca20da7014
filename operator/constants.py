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

# Node annotations written from the bandwidth probe (or by hand on clusters that cannot run it).
READ_GBPS_ANNOTATION = f"{GROUP}/host-read-gbps"
PROBE_RESULT_ANNOTATION = f"{GROUP}/bandwidth-probe"
PROBE_COMPONENT = "bandwidth-probe"
PROBE_NODE_LABEL = f"{GROUP}/probe-node"

# GPU Feature Discovery labels.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB per GPU
GPU_COUNT_LABEL = "nvidia.com/gpu.count"

GATEWAY_PORT = 8000
SHM_PATH = "/dev/shm"
MODEL_MOUNT = "/models"
