#!/usr/bin/env bash
# Compatibility run of a real third-party client, guidellm, against `neo serve` on loopback:
# synthetic prompts, a fixed small number of requests per endpoint, synchronous profile.
#
#   benchmarks/guidellm_compat.sh OUT_DIR
#
# guidellm lives in its own venv so it cannot disturb the project's (install it with the
# CPU torch pin in the same command):
#   python3 -m venv /tmp/guidellm-venv && /tmp/guidellm-venv/bin/pip install torch==2.13.0 guidellm
# Environment: GUIDELLM (guidellm executable, default: guidellm on PATH), PY (the project's python,
# default .venv/bin/python), REQUESTS (per endpoint, default 16), PROMPT_TOKENS (64), OUTPUT_TOKENS (16),
# SERVE_ARGS (extra `neo serve` flags). Writes OUT_DIR/{chat,completions}.{json,yaml}, the console
# output of each run and the server log; exits non-zero if a run fails or any request errored.
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
GUIDELLM=${GUIDELLM:-guidellm}
REQUESTS=${REQUESTS:-16}
PROMPT_TOKENS=${PROMPT_TOKENS:-64}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-16}
MODEL=smollm2-135m-instruct
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
URL=http://127.0.0.1:$PORT

# guidellm counts tokens with a Hugging Face tokenizer: hand it the served model's own, from a folder.
"$PY" -c "
from neo_common.model_source import embedded_gguf_path
from neo_gateway.tokenizer import TextTokenizer
TextTokenizer.from_gguf(embedded_gguf_path()).save('$WORK/tokenizer')"

"$PY" -m neo_common.cli serve --port "$PORT" --worker-addr "tcp://127.0.0.1:$(free_port)" \
    --cpu-attention-addr "tcp://127.0.0.1:$(free_port)" ${SERVE_ARGS:-} >"$OUT/serve.log" 2>&1 &
SERVER=$!
cleanup() {
    if kill -0 "$SERVER" 2>/dev/null; then
        kill -TERM "$SERVER"
        for _ in $(seq 60); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$SERVER" 2>/dev/null || true
    fi
    wait "$SERVER" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

for _ in $(seq 480); do
    curl -sf "$URL/ready" >/dev/null && break
    kill -0 "$SERVER" 2>/dev/null || { echo "neo serve exited; see $OUT/serve.log" >&2; exit 1; }
    sleep 0.5
done
curl -sf "$URL/ready" >/dev/null || { echo "neo serve not ready after 240 s" >&2; exit 1; }

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
run() {  # NAME REQUEST_FORMAT
    "$GUIDELLM" run \
        --backend "kind=openai_http,target=$URL,model=$MODEL,request_format=$2" \
        --profile kind=synchronous \
        --constraint "kind=max_requests,count=$REQUESTS" \
        --constraint kind=max_errors,count=1 \
        --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" \
        --tokenizer "kind=huggingface_auto,model=$WORK/tokenizer" \
        --output "kind=json,path=$OUT/$1.json" --output "kind=yaml,path=$OUT/$1.yaml" \
        --disable-console-interactive 2>&1 | tee "$OUT/$1.console.txt"
}
run chat /v1/chat/completions
run completions /v1/completions

# The reports are meant to be committed: no paths of this machine in them.
sed -i "s#$WORK#<tmp>#g; s#$OUT/#<out>/#g" "$OUT"/*.json "$OUT"/*.yaml "$OUT"/*.console.txt

# guidellm records failures in its report rather than in its exit code: check the counts.
"$PY" - "$OUT" "$REQUESTS" <<'PYEOF'
import json, sys
out, want = sys.argv[1], int(sys.argv[2])
for name in ("chat", "completions"):
    report = json.load(open(f"{out}/{name}.json"))
    for bench in report["benchmarks"]:
        totals = bench["metrics"]["request_totals"]
        print(f"{name}: successful={totals['successful']} errored={totals['errored']} incomplete={totals['incomplete']}")
        assert totals["successful"] == want and totals["errored"] == 0 and totals["incomplete"] == 0, totals
PYEOF
