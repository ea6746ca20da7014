#!/usr/bin/env bash
# Issue-19 FP8 evidence on an H100/H200 host, in one run: (1) the FP8 tests on CUDA (the
# _scaled_mm path, the Triton row quantizer, CUDA-graph replays of an FP8 model, FP8 checkpoints
# against transformers on their dequantized weights; the CPU tests of the same files alongside),
# then (2) benchmarks/fp8.py: FP8 against bf16 for dummy llama-3-8b and a random tiny Llama
# (agreement, decode at batch 1/32/128, prefill 4096, ABBA-interleaved). Needs .whl/ (env.sh).
#   run: bash benchmarks/gpu_host/fp8.sh   (results under $OUT)
set -uo pipefail
source benchmarks/gpu_host/env.sh
hardware "$OUT" name,memory.total,driver_version,clocks.max.sm; cat "$OUT/hardware.txt"
build_native /tmp/build.log
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu_worker/test_fp8_cuda.py \
  tests/gpu_worker/test_fp8_checkpoints.py 2>&1 | tee "$OUT/tests_cuda.txt" | tail -25
timeout 390 python3 benchmarks/fp8.py --out "$OUT" ${FP8_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/fp8.txt"
