# NEO gpu-worker: model weights, the GPU paged KV cache and the iteration executor (`neo gpu-worker`).
# CUDA base image; torch (a CUDA build) comes from pip. Build from the repository root:
#   dockerfiles/build.sh gpu-worker     or     docker build -f dockerfiles/gpu-worker.Dockerfile .
# Default base: NVIDIA's CUDA 13.0 "base" flavour on Ubuntu 24.04 (Python 3.12), pinned by tag and
# digest. torch wheels bring their own CUDA libraries, so the base only has to carry the CUDA runtime
# and the NVIDIA container-toolkit settings; the host driver must support CUDA 13.
ARG BASE_IMAGE=docker.io/nvidia/cuda:13.0.1-base-ubuntu24.04@sha256:f8ef28f579ea42a44b415d2c5d46f788e6a9b395c6c83f2929416e1fc192c143

# --- the distribution's Python: the interpreter both the builder's venv and the runtime use --------
FROM ${BASE_IMAGE} AS runtime-base
ARG DEBIAN_FRONTEND=noninteractive
# apt versions follow the pinned base's security updates: see README ("Pins").
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 neo \
    && useradd --system --no-log-init --uid 10001 --gid neo --create-home --home-dir /home/neo \
        --shell /usr/sbin/nologin neo

# --- toolchain: compiler, headers and a venv, shared by the stages that build ---------------------
FROM runtime-base AS toolchain
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/neo
# Optional build secrets `pipconf` and `cacert` reach pip only during the RUN steps that mount them
# (see gateway.Dockerfile and README).
ENV PATH=/opt/neo/bin:$PATH \
    PIP_CONFIG_FILE=/run/secrets/pipconf \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY dockerfiles/pyproject-deps.py pyproject.toml ./

# --- native: the C++ extension alone, so Python-only changes do not recompile it -------------------
FROM toolchain AS native
COPY setup.py README.md ./
COPY services/common/host_kernel/csrc ./services/common/host_kernel/csrc
COPY services/gpu_worker/csrc ./services/gpu_worker/csrc
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    python3 pyproject-deps.py pyproject.toml --build-system > build-requirements.txt \
    && pip install --no-cache-dir -r build-requirements.txt \
    && python3 setup.py -q build_ext

# --- builder: torch, the requirements and the package in the venv -------------------------------
FROM toolchain AS builder
# torch first: the largest layer, and the one that changes least. TORCH_INDEX_URL empty: the pip
# index's default build (on PyPI, Linux x86-64 wheels are CUDA builds); or name a CUDA-specific index,
# e.g. https://download.pytorch.org/whl/cu130.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"; \
    else \
        pip install --no-cache-dir "torch==$TORCH_VERSION"; \
    fi
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    python3 pyproject-deps.py pyproject.toml --exclude torch > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
# Everything .dockerignore admits: the package's folders (pyproject's package-dir) and metadata.
COPY . ./
# setuptools skips an extension whose built file is newer than its sources: the one from `native`.
COPY --from=native /src/build ./build
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    pip install --no-cache-dir --no-deps . \
    && neo --help > /dev/null

# --- runtime: interpreter + venv, non-root ----------------------------------------------------------
FROM runtime-base AS runtime
COPY --from=builder /opt/neo /opt/neo
COPY --chmod=0755 dockerfiles/healthcheck.py /usr/local/bin/neo-healthcheck
# Every NEO_* variable maps to a `neo` flag. Give the pod a memory-backed /dev/shm large enough for
# the CPU KV pool, which this process registers with the CUDA driver and shares with cpu-attention.
ENV PATH=/opt/neo/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/neo
# No HTTP port: it talks ZeroMQ to the gateway, whose /health reports a dead worker; this is liveness.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["neo-healthcheck", "process"]
ENTRYPOINT ["neo", "gpu-worker"]
# Labels last: the per-commit values do not invalidate the layers above.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="neo-gpu-worker" \
      org.opencontainers.image.description="NEO LLM serving: GPU worker (model, GPU KV cache, iteration executor)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
