#!/usr/bin/env bash
# Captured pipeline stages (issue 4) and the CPU-attention layout under tensor parallelism (issue 8),
# on a one-GPU host in one run:
#   (1) the stage graphs and the decode graphs against their eager twins on the device (real replays);
#   (2) CPU attention over llama-3-70b's KV heads: one process vs one pinned process per rank
#       (benchmarks/cpu_attention_split.py), before any server loads the host;
#   (3) NEO vs GPU-only, workload b then a, with the pipelined stages captured (auto) and launched
#       from Python (auto-eager) side by side in one run.
# Cost tables come from NEO_COST_CACHE_DIR when it holds this host's (else they are profiled).
# CHECKS=0 skips (1) and (2); VARIANT= (empty) skips the auto-eager server; MODES (default off,auto)
# picks the offload modes, WORKLOADS (default "b a") the workloads, OFFLINE the offline prompts.
# Everything lands in one archive, $OUT/pipeline_graphs.tgz, plus a summary.txt.
set -uo pipefail
source benchmarks/gpu_host/env.sh
RUN=$OUT/run
prepare_run "$RUN" || exit 1
[ "${CHECKS:-1}" = 1 ] && timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu_worker/test_stage_graphs.py \
  tests/gpu_worker/test_cuda_graph.py > "$RUN/tests_cuda.txt" 2>&1
[ "${CHECKS:-1}" = 1 ] && timeout 120 python3 -m neo_bench.cpu_attention_split --model llama-3-70b --threads "${SPLIT_THREADS:-12}" \
  --ranks 1,2,4 --reps 5 --out "$RUN" > "$RUN/cpu_attention_split.txt" 2>&1
for wl in ${WORKLOADS:-b a}; do
  case "$wl" in
    b) ARGS=(N=16 RATES=8 OFFLINE=${OFFLINE:-96} CPU_BLOCKS=1600) ;;
    a|c) ARGS=(N=16 RATES=4 OFFLINE=${OFFLINE:-64} CPU_BLOCKS=6000) ;;
  esac
  env "${ARGS[@]}" WORKLOAD=$wl CPU_THREADS=${CPU_THREADS:-12} MODES=${MODES:-off,auto} VARIANT=${VARIANT-'auto-eager=auto:--pipeline-graphs false'} \
    OUT="$RUN/$wl" timeout "${WL_TIMEOUT:-250}" bash benchmarks/gpu_host/neo_vs_gpu_only.sh > "$RUN/$wl.log" 2>&1
  grep -h "pipelined forward\|captured" "$RUN/$wl"/serve_*auto*.log 2>/dev/null | sed "s/^/$wl: /" | tail -8 >> "$RUN/worker_lines.txt"
done
{ cat "$RUN/hardware.txt"; tail -4 "$RUN/tests_cuda.txt"; grep -v "^$" "$RUN/cpu_attention_split.txt" | tail -8
  for wl in ${WORKLOADS:-b a}; do echo "== $wl"; sed -n '/offline done/,$p' "$RUN/$wl/neo_vs_gpu_only_$wl.txt" 2>/dev/null; done
  cat "$RUN/worker_lines.txt" 2>/dev/null; } > "$OUT/summary.txt"
(cd "$RUN" && tar czf "$OUT/pipeline_graphs.tgz" .) && rm -rf "$RUN"
cat "$OUT/summary.txt"
