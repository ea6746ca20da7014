#!/usr/bin/env bash
# Issue-7 evidence, part 1, on an H100/H200 host: (1) the Triton kernels and the CUDA-graph decode
# path against their torch twins on the device (the same tests CI runs through Triton's
# interpreter and the graph path's CPU twin); (2) the roofline of llama-3-8b decode and prefill for
# the three GPU paths side by side (graphs / eager Triton / torch twins); (3) scheduler + IPC
# overhead at batch 256 through the full stack. Needs .whl/ and .gpu/tokenizer (env.sh).
set -uo pipefail
source benchmarks/gpu_host/env.sh
hardware "$OUT"; cat "$OUT/hardware.txt"

build_native /tmp/build.log
if [ "${KERNEL_TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/gpu_worker/test_kernels.py tests/gpu_worker/test_cuda_graph.py \
    tests/gpu_worker/test_serve_loop.py 2>&1 | tee "$OUT/kernels_cuda.txt" | tail -15
fi

if [ "${ROOFLINE:-1}" = 1 ]; then
  python3 benchmarks/roofline.py --geometry llama-3-8b --out "$OUT/roofline" ${ROOFLINE_ARGS:-} 2>&1 \
    | grep -v Warning | tee "$OUT/roofline.txt"
fi

# 256 requests at once, short prompts, long outputs: most iterations decode 256 rows. Run with async
# scheduling and launch-ahead (the defaults), with the worker replying before it launches the next
# plan, and without async scheduling, side by side.
overhead() {  # $1 label, $2... extra serve flags
  local label=$1; shift
  python3 -m neo_common.cli serve --model llama-3-8b --load-format dummy --tokenizer .gpu/tokenizer --port 8000 \
    --max-model-len 2048 --max-num-seqs 256 "$@" > "$OUT/serve_$label.log" 2>&1 &
  local serve=$!
  for _ in $(seq 300); do curl -sf localhost:8000/ready >/dev/null && break; sleep 1; done
  # a short warm-up first (Triton compiles the prefill shapes once per host), left out of the figures
  python3 -m neo_common.cli bench --model llama-3-8b --workload fixed --input-len 128 --output-len 16 \
    --num-prompts 32 --rates inf --vocab 32000 --label warmup --out /tmp/warmup > /dev/null 2>&1
  curl -s localhost:8000/metrics > "$OUT/metrics_start_$label.txt"
  python3 -m neo_common.cli bench --model llama-3-8b --workload fixed --input-len 128 --output-len 256 \
    --num-prompts 256 --rates inf --vocab 32000 --label "$label" --out "$OUT" > "$OUT/bench_$label.txt" 2>&1 &
  local bench=$!
  # The full-batch window starts once all 256 requests are admitted and none waits.
  for _ in $(seq 600); do
    curl -s localhost:8000/metrics > "$OUT/metrics_full_$label.txt"
    grep -q '^vllm:num_requests_running{.*} 256' "$OUT/metrics_full_$label.txt" \
      && grep -q '^vllm:num_requests_waiting{.*} 0' "$OUT/metrics_full_$label.txt" && break
    sleep 0.05
  done
  wait $bench; grep -v "it/s" "$OUT/bench_$label.txt" | tail -2 | tee -a "$OUT/overhead.txt"
  curl -s localhost:8000/metrics > "$OUT/metrics_$label.txt"
  { echo -n "$label, whole run: "; python3 -m neo_bench.overhead "$OUT/metrics_$label.txt" --since "$OUT/metrics_start_$label.txt"
    echo -n "$label, batch 256 (all admitted): "
    python3 -m neo_bench.overhead "$OUT/metrics_$label.txt" --since "$OUT/metrics_full_$label.txt"; } \
    | tee -a "$OUT/overhead.txt"
  kill -TERM $serve; wait $serve
  grep -E "captured|ERROR|Traceback" "$OUT/serve_$label.log" | head -5
  rm -f "$OUT/metrics_$label.txt" "$OUT/metrics_full_$label.txt" "$OUT/metrics_start_$label.txt" "$OUT/serve_$label.log" "$OUT/bench_$label.txt"
}
# OVERHEAD_VARIANTS picks the servers and their order (default: async reply_first sync)
if [ "${OVERHEAD:-1}" = 1 ]; then
  for variant in ${OVERHEAD_VARIANTS:-async reply_first sync}; do
    case "$variant" in
      async) overhead overhead_b256_async ;;
      reply_first) overhead overhead_b256_reply_first --launch-ahead false ;;
      sync) overhead overhead_b256_sync --async-scheduling false ;;
      *) echo "unknown overhead variant $variant" >&2 ;;
    esac
  done
  rm -f "$OUT"/bench_overhead_b256_sync.* "$OUT"/bench_overhead_b256_reply_first.*
fi
