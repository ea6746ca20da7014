#!/usr/bin/env bash
# Issue-2 evidence on an H100/H200 host: (1) the greedy-equivalence tests on CUDA (random Llama-3.1
# with rope scaling and random Qwen2 vs transformers); (2) the dummy llama-3-8b geometry served
# through the full stack (neo serve -> gateway -> gpu worker) and driven by the openai client.
# Writes logs and JSON under $OUT. Needs .whl/ and .gpu/tokenizer (see env.sh).
set -uo pipefail
source benchmarks/gpu_host/env.sh
hardware "$OUT"; cat "$OUT/hardware.txt"

python3 -m pytest -q -p no:cacheprovider tests/gpu_worker/test_model_equivalence.py -k random 2>&1 \
  | tee "$OUT/equivalence_cuda.txt" | tail -3

python3 -m neo_common.cli serve --model llama-3-8b --load-format dummy --tokenizer .gpu/tokenizer \
  --port 8000 --max-model-len 4096 > "$OUT/serve_llama3_8b.log" 2>&1 &
SERVE=$!
for _ in $(seq 240); do curl -sf localhost:8000/ready >/dev/null && break; sleep 1; done
curl -s localhost:8000/health; echo
python3 benchmarks/serve_smoke.py --model llama-3-8b --requests 64 --prompt-len 512 --max-tokens 128 \
  --out "$OUT/serve_llama3_8b.json" 2>&1 | tee "$OUT/serve_llama3_8b.txt"
curl -s localhost:8000/metrics | grep -E '^neo:(gpu_kv|num_req|generation_tokens_total)' | tee -a "$OUT/serve_llama3_8b.txt"
kill -TERM $SERVE; wait $SERVE
tail -5 "$OUT/serve_llama3_8b.log"
