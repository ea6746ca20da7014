#!/usr/bin/env bash
# Frontend/core split evidence on an H100/H200 host, in one run (~5 minutes): does a busy API server
# slow the engine core? (issue: the core's per-iteration overhead beyond the GPU step < 1%, and TPOT p50
# unchanged while 1,000 idle connections and a stream of 1 MB prompts hit the API server)
#  1. the benchmark's own unit tests (tests/benchmarks/test_frontend_isolation.py, the real-server case
#     deselected: it runs the embedded model, not among .whl/'s wheels);
#  2. benchmarks/frontend_isolation.py: one `neo serve` of dummy llama-3-8b, a burst of N=256 requests
#     at once (--max-num-seqs 256: one batch) of INPUT_LEN=128 prompt and OUTPUT_LEN=256 generated
#     tokens, quiet against loaded (IDLE=1000 idle keep-alive connections held open and BIG-byte text
#     prompts posted back to back, from a process of its own), REPS=3 repetitions ABBA. Per variant:
#     TPOT p50, output tok/s, the core's overhead 1 - worker/wall per iteration (/metrics).
# Sizing: a 16-token block of llama-3-8b in bf16 is 2 MiB; N x (INPUT_LEN + OUTPUT_LEN) = 256 x 384
# tokens is 6144 blocks, BLOCKS=7000 leaves slack (13.7 GiB). Prompt ids are drawn below 32000
# (.gpu/tokenizer's vocabulary is smaller than the model's).
# Big prompts: .gpu/tokenizer's longest token is 81 characters, so at llama-3-8b's 8192-token context the
# API server refuses a prompt over 663,552 characters before tokenizing it (400 "at least N tokens ...
# characters"): the default 1 MB ones cost it the JSON body only. BIG=600000 makes it tokenize each whole
# (~150k tokens) before the 400; the JSON's big_prompt_messages say which path ran.
# $OUT holds tests.txt, frontend_isolation_<label>.{json,png}, frontend_isolation.txt and logs.tgz
# (build, server and benchmark logs, hardware.txt). Needs .whl/ and .gpu/tokenizer (env.sh).
#   run: bash benchmarks/gpu_host/frontend_isolation.sh   (results under $OUT)
set -uo pipefail
source benchmarks/gpu_host/env.sh
MODEL=llama-3-8b
N=${N:-256}; INPUT_LEN=${INPUT_LEN:-128}; OUTPUT_LEN=${OUTPUT_LEN:-256}; REPS=${REPS:-3}; BLOCKS=${BLOCKS:-7000}
IDLE=${IDLE:-1000}; BIG=${BIG:-1048576}
LABEL="${MODEL}_c${N}"; LOGS="$OUT/logs"; mkdir -p "$LOGS"
prepare_run "$LOGS" || exit 1

timeout 120 python3 -m pytest -q -x -p no:cacheprovider -m "not integration" tests/benchmarks/test_frontend_isolation.py \
  > "$OUT/tests.txt" 2>&1
TESTS=$?

timeout 540 python3 -m neo_bench.frontend_isolation --model "$MODEL" --load-format dummy --tokenizer .gpu/tokenizer \
  --num-gpu-blocks "$BLOCKS" --max-num-seqs "$N" --concurrency "$N" --input-len "$INPUT_LEN" \
  --output-len "$OUTPUT_LEN" --reps "$REPS" --vocab 32000 --idle-connections "$IDLE" --big-prompt-bytes "$BIG" \
  --label "$LABEL" --out "$OUT" > "$OUT/frontend_isolation.txt" 2> "$LOGS/frontend_isolation.log"
BENCH=$?
[ "$BENCH" = 0 ] || tail -5 "$LOGS/frontend_isolation.log"
mv "$OUT"/serve_"$LABEL"_*.log "$LOGS"/ 2>/dev/null
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"

echo "== $(tar -xOzf "$OUT/logs.tgz" logs/hardware.txt | head -1)"
echo "== tests (rc $TESTS): $(tail -1 "$OUT/tests.txt")"
echo "== frontend_isolation (rc $BENCH)"
cat "$OUT/frontend_isolation.txt"
exit $(( TESTS || BENCH ))
