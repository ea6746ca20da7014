# NEO cpu-attention: the native CPU decode-attention kernel and the process serving it
# (`neo cpu-attention`; also `neo probe-bandwidth`, the operator's per-node probe).
# CPU-only and without torch (see dockerfiles/README.md). Build from the repository root:
#   dockerfiles/build.sh cpu-attention     or     docker build -f dockerfiles/cpu-attention.Dockerfile .
# Default base: Debian bookworm slim, pinned by tag and digest. Override with --build-arg BASE_IMAGE.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim@sha256:d5d3f9c23164ea16f31852f95bd5959aad1c5e854332fe00f7b3a20fcc9f635c

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
# Optional build secrets reach pip only during the RUN steps that mount them: `pipconf` (a pip.conf,
# e.g. an index mirror and `cert = /run/secrets/cacert`) and `cacert` (a CA bundle). Without them pip
# uses PyPI. dockerfiles/build.sh passes this machine's settings.
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

# --- builder: the requirements and the package in the venv ----------------------------------------
FROM toolchain AS builder
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    python3 pyproject-deps.py pyproject.toml --exclude torch > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
# No torch: should cpu_attention come to import it, build with --build-arg TORCH_VERSION=X.Y.Z (CPU
# wheels from TORCH_INDEX_URL).
ARG TORCH_VERSION=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    if [ -n "$TORCH_VERSION" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"; \
    fi
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
# Every NEO_* variable maps to a `neo` flag. Run it with the gpu-worker's memory-backed /dev/shm:
# the KV pool is a POSIX shared-memory segment that both processes map (same UID 10001).
ENV PATH=/opt/neo/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/neo
# No HTTP port: it talks ZeroMQ to the gateway and shared memory to the gpu-worker; the check is liveness.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["neo-healthcheck", "process"]
ENTRYPOINT ["neo", "cpu-attention"]
# Labels last: the per-commit values do not invalidate the layers above.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="neo-cpu-attention" \
      org.opencontainers.image.description="NEO LLM serving: CPU decode attention over host-resident KV cache (CPU-only)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
