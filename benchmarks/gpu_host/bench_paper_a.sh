#!/usr/bin/env bash
# GPU-only baseline of the paper's workload (a) on an H100/H200 host: dummy llama-3-8b, GPU KV limited
# to 1650 blocks (the paper's A10G setting), `neo bench --workload paper-a` at a few request rates,
# and the gateway's iteration histograms (gateway wall vs worker time = scheduler + IPC overhead).
set -uo pipefail
source benchmarks/gpu_host/env.sh
# SERVE_ARGS adds serve flags (e.g. --enforce-eager), LABEL names the run.
BLOCKS=${BLOCKS:-1650}; RATES=${RATES:-1,2,inf}; N=${N:-64}; LABEL=${LABEL:-paper-a_${BLOCKS}blocks}
python3 -m neo_common.cli serve --model llama-3-8b --load-format dummy --tokenizer .gpu/tokenizer --port 8000 \
  --num-gpu-blocks "$BLOCKS" --max-model-len 4096 ${SERVE_ARGS:-} > "$OUT/serve.log" 2>&1 &
SERVE=$!
for _ in $(seq 240); do curl -sf localhost:8000/ready >/dev/null && break; sleep 1; done
python3 -m neo_common.cli bench --model llama-3-8b --workload paper-a --num-prompts "$N" --rates "$RATES" \
  --vocab 32000 --label "$LABEL" --out "$OUT" 2>&1 | grep -v "it/s" | tee "$OUT/bench.txt"
curl -s localhost:8000/metrics > "$OUT/metrics.txt"
python3 -m neo_bench.overhead "$OUT/metrics.txt" | tee -a "$OUT/bench.txt"
kill -TERM $SERVE; wait $SERVE
