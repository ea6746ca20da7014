# The shared preamble of the GPU-host scripts: source it from the repository root of a checkout on a
# GPU host whose Python already has torch and Triton. The other dependencies (pyzmq, fastapi,
# uvicorn, pydantic, gguf, openai, ...) are installed from the wheels in .whl/ without an index, and
# the package's import names are mapped onto the service folders with symlinks instead of installing
# it. Sets OUT (default /tmp/out), where every script writes its results.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/neo_pkgs
for p in common gateway gpu_worker cpu_attention; do ln -sfn "$PWD/services/$p" "/tmp/neo_pkgs/neo_$p"; done
ln -sfn "$PWD/operator" /tmp/neo_pkgs/neo_operator
ln -sfn "$PWD/benchmarks" /tmp/neo_pkgs/neo_bench
export PYTHONPATH=/tmp/neo_pkgs:/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"

# hardware DIR [FIELDS]: DIR/hardware.txt with the GPUs (nvidia-smi FIELDS, default name, memory and
# driver), the CPU, and the torch and Triton versions.
hardware() {
  mkdir -p "$1"
  { nvidia-smi --query-gpu="${2:-name,memory.total,driver_version}" --format=csv,noheader
    lscpu | grep -E 'Model name|^CPU\(s\)'
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } > "$1/hardware.txt" 2>&1
}

# build_native LOG: the native CPU-attention extension built in place (log in LOG); returns non-zero,
# printing the log's tail, when the build fails.
build_native() {
  NEO_BUILD_JOBS=16 python3 setup.py -q build_ext --inplace > "$1" 2>&1 || { tail -20 "$1"; return 1; }
}

# prepare_run DIR: DIR/hardware.txt and the native extension built (log in DIR/build.log).
prepare_run() {
  hardware "$1"; build_native "$1/build.log"
}
