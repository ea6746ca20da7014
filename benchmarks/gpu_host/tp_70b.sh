#!/usr/bin/env bash
# llama-3-70b over 2 GPUs (issue 8's 70B regime, issue 4's gain there), in one run on a 2-GPU host:
# NEO vs GPU-only on the paper-a workload with GPU KV limited to 2925 blocks per rank (2 x H100-80GB
# at utilization 0.9), with the pipelined stages captured (auto) and launched from Python
# (auto-eager) side by side. Pin a cost table by putting it in NEO_COST_CACHE_DIR (else profiled).
# Everything lands in $OUT/tp_70b.tgz plus summary.txt.
set -uo pipefail
source benchmarks/gpu_host/env.sh
RUN=$OUT/run
prepare_run "$RUN" || exit 1
WORKLOAD=d N=${N:-32} RATES=${RATES:-2} OFFLINE=${OFFLINE:-128} CPU_THREADS=${CPU_THREADS:-24} MODES=off,auto \
  VARIANT=${VARIANT-'auto-eager=auto:--pipeline-graphs false'} OUT="$RUN/d" timeout "${WL_TIMEOUT:-500}" \
  bash benchmarks/gpu_host/neo_vs_gpu_only.sh > "$RUN/d.log" 2>&1
{ cat "$RUN/hardware.txt"; sed -n '/offline done/,$p' "$RUN/d/neo_vs_gpu_only_d.txt" 2>/dev/null
  grep -h "pipelined forward\|captured\|pipeline overhead" "$RUN"/d/serve_*.log 2>/dev/null | tail -12
  grep -hiE "traceback|error" "$RUN"/d/serve_*.log 2>/dev/null | grep -v "gpu_worker disconnected" | head -5
  tail -3 "$RUN/d.log"; } > "$OUT/summary.txt"
(cd "$RUN" && tar czf "$OUT/tp_70b.tgz" .) && rm -rf "$RUN"
cat "$OUT/summary.txt"
