#!/usr/bin/env bash
# Tensor parallelism (issue 8) on a 2-GPU host, in one call: build, then greedy agreement and decode
# speed on dummy llama-3-8b with benchmarks/tp_agreement.py (its docstring says why these pairs):
#   (a) TP=1 vs TP=2, float32, torch kernels, eager: the sharding, the all-reduce, the token broadcast;
#   (b) TP=2 eager vs TP=2 CUDA graphs (bf16, Triton kernels; the NCCL all-reduce captured), and TP=1
#       with graphs for the speed comparison.
# The 70B NEO vs GPU-only run is `WORKLOAD=d bash benchmarks/gpu_host/neo_vs_gpu_only.sh` (minutes).
# Writes tables, JSON, PNG and logs under $OUT.
set -uo pipefail
source benchmarks/gpu_host/env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NEO_BUILD_JOBS=16 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
rm -f "$OUT/build.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
MODEL=${MODEL:-llama-3-8b}
COMMON=(--model "$MODEL" --load-format dummy --tokenizer .gpu/tokenizer --max-model-len 2048 --num-gpu-blocks 4096
        --max-num-seqs 64 --num-prompts "${N:-48}" --max-tokens "${MAX_TOKENS:-64}" --out "$OUT")
EAGER32="--dtype float32 --kernels torch --enforce-eager"
python3 -m neo_bench.tp_agreement "${COMMON[@]}" --label "${MODEL}_fp32" \
  --variant "tp1-fp32|--tensor-parallel-size 1 $EAGER32" --variant "tp2-fp32|--tensor-parallel-size 2 $EAGER32" \
  > "$OUT/run_fp32.log" 2>&1; rc_a=$?
python3 -m neo_bench.tp_agreement "${COMMON[@]}" --label "${MODEL}_bf16" \
  --variant "tp2-eager|--tensor-parallel-size 2 --enforce-eager" --variant "tp2-graphs|--tensor-parallel-size 2" \
  --variant "tp1-graphs|--tensor-parallel-size 1" > "$OUT/run_bf16.log" 2>&1; rc_b=$?
for f in "$OUT"/tp_agreement_*.json; do python3 - "$f" <<'PY'
import json, sys
from neo_bench.tp_agreement import table
r = json.load(open(sys.argv[1])); print("==", r["label"]); print(table(r))
PY
done | tee "$OUT/tp_agreement.txt"
grep -hiE "error|traceback" "$OUT"/serve_*.log | head -20
rm -f "$OUT"/serve_*.log   # the device returns a handful of files; the run logs keep the servers' tails on failure
[ "$rc_a" = 0 ] && [ "$rc_b" = 0 ]
