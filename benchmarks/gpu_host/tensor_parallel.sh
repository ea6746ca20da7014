#!/usr/bin/env bash
# Tensor parallelism (issue 8) on a 2-GPU host, in one run: build, then greedy agreement and decode
# speed on dummy llama-3-8b with benchmarks/tp_agreement.py (its docstring says why these pairs):
#   (a) TP=1 vs TP=2, float32, torch kernels, eager: the sharding, the all-reduce, the token broadcast;
#   (b) TP=2 eager vs TP=2 CUDA graphs, float32, Triton kernels: the captured NCCL all-reduce;
#   (c) bf16 (what is served): TP=2 and TP=1, eager and graphs, for speed; eager vs graphs at TP=1 is
#       the control for how far bf16 rounding alone (batch shapes, kernel choice) moves greedy texts.
# The 70B NEO vs GPU-only run is `WORKLOAD=d bash benchmarks/gpu_host/neo_vs_gpu_only.sh` (minutes).
# Writes tables, JSON, PNG and logs under $OUT.
set -uo pipefail
source benchmarks/gpu_host/env.sh
build_native "$OUT/build.log" || exit 1
rm -f "$OUT/build.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
MODEL=${MODEL:-llama-3-8b}
COMMON=(--model "$MODEL" --load-format dummy --tokenizer .gpu/tokenizer --max-model-len 2048 --num-gpu-blocks 4096
        --max-num-seqs 64 --num-prompts "${N:-48}" --max-tokens "${MAX_TOKENS:-64}" --out "$OUT")
EAGER32="--dtype float32 --kernels torch --enforce-eager"
python3 -m neo_bench.tp_agreement "${COMMON[@]}" --label "${MODEL}_fp32" \
  --variant "tp1-fp32|--tensor-parallel-size 1 $EAGER32" --variant "tp2-fp32|--tensor-parallel-size 2 $EAGER32" \
  > "$OUT/run_fp32.log" 2>&1; rc_a=$?
python3 -m neo_bench.tp_agreement "${COMMON[@]}" --label "${MODEL}_fp32_graphs" \
  --variant "tp2-eager-fp32|--tensor-parallel-size 2 --dtype float32 --enforce-eager" \
  --variant "tp2-graphs-fp32|--tensor-parallel-size 2 --dtype float32" > "$OUT/run_fp32_graphs.log" 2>&1; rc_b=$?
python3 -m neo_bench.tp_agreement "${COMMON[@]}" --label "${MODEL}_bf16" \
  --variant "tp2-eager|--tensor-parallel-size 2 --enforce-eager" --variant "tp2-graphs|--tensor-parallel-size 2" \
  --variant "tp1-eager|--tensor-parallel-size 1 --enforce-eager" --variant "tp1-graphs|--tensor-parallel-size 1" \
  > "$OUT/run_bf16.log" 2>&1; rc_c=$?
for f in "$OUT"/tp_agreement_*.json; do python3 - "$f" <<'PY'
import json, sys
from neo_bench.tp_agreement import table
r = json.load(open(sys.argv[1])); print("==", r["label"]); print(table(r))
PY
done | tee "$OUT/tp_agreement.txt"
grep -hiE "error|traceback" "$OUT"/serve_*.log | grep -v "gpu_worker disconnected" | head -20
# everything but the table in one archive
(cd "$OUT" && tar czf tp_results.tgz --exclude tp_results.tgz --exclude tp_agreement.txt * && \
  find . -maxdepth 1 -type f ! -name tp_results.tgz ! -name tp_agreement.txt -delete)
[ "$rc_a" = 0 ] && [ "$rc_b" = 0 ] && [ "$rc_c" = 0 ]
