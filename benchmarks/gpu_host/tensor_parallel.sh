#!/usr/bin/env bash
# Tensor parallelism (issue 8) on a 2-GPU host, in one call: build, then TP=2 vs TP=1 greedy
# agreement and decode speed on dummy llama-3-8b (CUDA graphs with the NCCL all-reduce inside,
# Triton kernels) with benchmarks/tp_agreement.py. The 70B NEO vs GPU-only run is
# `WORKLOAD=d bash benchmarks/gpu_host/neo_vs_gpu_only.sh` (a separate call: it takes minutes).
# Writes the table, JSON, PNG and logs under $OUT.
set -uo pipefail
source benchmarks/gpu_host/env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NEO_BUILD_JOBS=16 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
MODEL=${MODEL:-llama-3-8b}
python3 -m neo_bench.tp_agreement --tp-sizes "${TP_SIZES:-1,2}" --num-prompts "${N:-64}" --max-tokens "${MAX_TOKENS:-64}" \
  --label "$MODEL" --out "$OUT" --model "$MODEL" --load-format dummy --tokenizer .gpu/tokenizer \
  --max-model-len 2048 --num-gpu-blocks 4096 --max-num-seqs 64 2>&1 | tee "$OUT/tp_agreement_${MODEL}.txt"
exit "${PIPESTATUS[0]}"
