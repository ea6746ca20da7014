# Source on the GPU host (device tool) from the repository root. The image has torch and friends but
# none of pyzmq/fastapi/uvicorn/pydantic/gguf/openai: those travel as wheels in .whl/ (fetched by
# the shared gpu-host-wheels.sh with the extras `openai distro jiter sniffio`). The package is not
# installed there: its import names are mapped onto the service folders with symlinks instead.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/neo_pkgs
for p in common gateway gpu_worker cpu_attention; do ln -sfn "$PWD/services/$p" "/tmp/neo_pkgs/neo_$p"; done
ln -sfn "$PWD/operator" /tmp/neo_pkgs/neo_operator
ln -sfn "$PWD/benchmarks" /tmp/neo_pkgs/neo_bench
export PYTHONPATH=/tmp/neo_pkgs:/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# prepare_run DIR: DIR/hardware.txt (GPUs, CPU) and the native extension built (log in DIR/build.log);
# returns non-zero, printing the build log's tail, when the build fails.
prepare_run() {
  mkdir -p "$1"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    lscpu | grep -E 'Model name|^CPU\(s\)'; } > "$1/hardware.txt"
  NEO_BUILD_JOBS=16 python3 setup.py -q build_ext --inplace > "$1/build.log" 2>&1 || { tail -20 "$1/build.log"; return 1; }
}
