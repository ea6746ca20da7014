#!/usr/bin/env bash
# GPU-only baseline of the paper's workload (a) on an H100/H200 host: dummy llama-3-8b, GPU KV limited
# to 1650 blocks (the paper's A10G setting), `neo bench --workload paper-a` at a few request rates,
# and the gateway's iteration histograms (gateway wall vs worker time = scheduler + IPC overhead).
set -uo pipefail
source benchmarks/gpu_host/env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BLOCKS=${BLOCKS:-1650}; RATES=${RATES:-1,2,inf}; N=${N:-64}
python3 -m neo_common.cli serve --model llama-3-8b --load-format dummy --tokenizer .gpu/tokenizer --port 8000 \
  --num-gpu-blocks "$BLOCKS" --max-model-len 4096 > "$OUT/serve.log" 2>&1 &
SERVE=$!
for _ in $(seq 240); do curl -sf localhost:8000/ready >/dev/null && break; sleep 1; done
python3 -m neo_common.cli bench --model llama-3-8b --workload paper-a --num-prompts "$N" --rates "$RATES" \
  --vocab 32000 --label "paper-a_gpu-only_${BLOCKS}blocks" --out "$OUT" 2>&1 | grep -v "it/s" | tee "$OUT/bench.txt"
curl -s localhost:8000/metrics > "$OUT/metrics.txt"
python3 - "$OUT/metrics.txt" <<'PY' | tee -a "$OUT/bench.txt"
import sys
vals = {}
for line in open(sys.argv[1]):
    if line.startswith("neo:") and " " in line:
        k, v = line.rsplit(" ", 1); vals[k.split("{")[0]] = float(v)
wall, work = vals["neo:iteration_duration_seconds_sum"], vals["neo:worker_iteration_seconds_sum"]
n = vals["neo:iteration_duration_seconds_count"]
print(f"iterations {n:.0f}: gateway wall {wall / n * 1e3:.2f} ms/iter, worker {work / n * 1e3:.2f} ms/iter, "
      f"scheduler+IPC overhead {(1 - work / wall) * 100:.1f}% of iteration time")
PY
kill -TERM $SERVE; wait $SERVE
