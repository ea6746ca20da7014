#!/usr/bin/env bash
# NEO vs GPU-only on emulated GPUs (docs/design.md, "GPU emulation"), on the GPU host, in one run:
# builds the native kernel, runs the CUDA test of the emulation's stage clock, then for each CASE
# (PRESET:WORKLOAD, e.g. a10g:a t4:b l4:a; PRESET "real" runs the real GPU) profiles the cost tables
# under the emulation and runs benchmarks/neo_vs_gpu_only.py: REPS interleaved repetitions (ABBA) of
# each mode on live, warmed-up servers. Workloads as in neo_vs_gpu_only.sh: a = Llama-3-8B, paper-a,
# 1650 GPU blocks (the paper's A10G budget); b = Llama-2-7B, paper-b, 54 GPU blocks (its T4 budget);
# l = Llama-3-8B, long inputs (~2000 +-50%, outputs ~110 +-50%), 1650 blocks.
# Everything lands in $OUT; a short table per case at the end.
set -uo pipefail
source benchmarks/gpu_host/env.sh
prepare_run "$OUT" || exit 1
CASES=${CASES:-a10g:a}; REPS=${REPS:-3}; OFFLINE=${OFFLINE:-64}; RATES=${RATES:-}; N=${N:-16}
CPU_THREADS=${CPU_THREADS:-0}

if [ "${SKIP_CUDA_TEST:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/gpu_worker/test_emulation.py -k cuda > "$OUT/cuda_test.log" 2>&1
  echo "cuda emulation test: rc=$? ($(tail -1 "$OUT/cuda_test.log"))"
fi
python3 -m neo_common.cli probe-bandwidth --json > "$OUT/bandwidth.json"
BW=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["read_gbps"])' "$OUT/bandwidth.json")
export NEO_COST_CACHE_DIR=${NEO_COST_CACHE_DIR:-$PWD/.cost-cache}   # profiles kept between runs

for case in $CASES; do
  preset=${case%%:*}; wl=${case##*:}
  case "$wl" in
    a) MODEL=llama-3-8b; WL=(--workload paper-a); BLOCKS=1650; CPU_BLOCKS=20000 ;;
    b) MODEL=llama-2-7b; WL=(--workload paper-b); BLOCKS=54; CPU_BLOCKS=6000 ;;
    l) MODEL=llama-3-8b; WL=(--workload uniform --input-len 2000 --output-len 110 --range-ratio 0.5); BLOCKS=1650
       CPU_BLOCKS=20000 ;;
    *) echo "workload $wl: use a, b or l" >&2; continue ;;
  esac
  EMU=(); [ "$preset" != real ] && EMU=(--emulate-gpu "$preset")
  label="${preset}_${wl}"
  COST="$OUT/cost_${label}.json"
  python3 -m neo_common.cli profile --model "$MODEL" --load-format dummy --tokenizer .gpu/tokenizer \
    --cpu-threads "$CPU_THREADS" --max-model-len 4096 --no-progress --output "$COST" "${EMU[@]}" \
    > "$OUT/profile_${label}.log" 2>&1 || { tail -20 "$OUT/profile_${label}.log"; COST=""; }
  python3 -m neo_bench.neo_vs_gpu_only --model "$MODEL" --load-format dummy --tokenizer .gpu/tokenizer \
    "${WL[@]}" --num-gpu-blocks "$BLOCKS" --num-cpu-blocks "$CPU_BLOCKS" --cpu-threads "$CPU_THREADS" \
    --max-model-len 4096 --modes off,auto --reps "$REPS" --num-prompts "$N" --rates "$RATES" \
    --offline-prompts "$OFFLINE" --vocab 32000 ${COST:+--cost-tables "$COST"} --host-bandwidth-gbs "$BW" \
    ${EMU[@]:+--emulate-gpu "$preset"} --label "$label" --out "$OUT" > "$OUT/neo_vs_gpu_only_${label}.txt" 2>&1
  echo "== $label (rc=$?)"; grep -A3 "^      mode reps" "$OUT/neo_vs_gpu_only_${label}.txt"; grep "^NEO (auto)" "$OUT/neo_vs_gpu_only_${label}.txt"
done
