#!/usr/bin/env bash
# GPU benchmark: the server with a random-weight Llama-3.2-1B-shaped model (bf16, no download), 1, 16 and 64
# concurrent SSE streams of 128-token prompts and 128 output tokens, for the hf and hf-cb engines.
# Usage: bench/gpu.sh OUT_DIR      (JSON per run in OUT_DIR, plus server logs; about 6 minutes)
# Override MODEL=random:path.json or CONCURRENCY="1 16 64" to change the load; PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu.sh OUT_DIR}
mkdir -p "$OUT"
PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-random:bench/llama-3.2-1b.json}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
PORT=${PORT:-8765}
export HF_HUB_OFFLINE=1 TRIPOD_MODEL="$MODEL" TRIPOD_SLOTS=64 TRIPOD_LOG_LEVEL=WARNING
export TRIPOD_DB_PATH="$OUT/db.sqlite3"
"$PYTHON" manage.py migrate --noinput -v 0

run_engine() {
    local engine=$1 budget=$2
    TRIPOD_ENGINE=$engine "$PYTHON" -m daphne -b 127.0.0.1 -p "$PORT" tripod.asgi:application >"$OUT/server-$engine.log" 2>&1 &
    local pid=$!
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
        sleep 1
    done
    for c in $CONCURRENCY; do
        # One wave for the slow engine, several for the batching one; each run has a time budget.
        [ "$engine" = "hf" ] && n=$c || n=$(( c < 8 ? 8 : 4 * c ))
        timeout "$budget" "$PYTHON" -m tripod.bench --url "http://127.0.0.1:$PORT" --transport sse \
            --concurrency "$c" --num-requests "$n" --prompt-len 128 --output-len 128 --warmup 2 --no-progress \
            --label "$engine c=$c $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" \
            --out "$OUT/$engine-c$c.json" >/dev/null \
            || echo "{\"engine\": \"$engine\", \"concurrency\": $c, \"error\": \"timed out after ${budget}s\"}" >"$OUT/$engine-c$c.json"
        echo "$engine c=$c: $("$PYTHON" -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('output_throughput', 'median_ttft_ms', 'median_itl_ms', 'error')})" "$OUT/$engine-c$c.json")"
    done
    kill "$pid"; wait "$pid" 2>/dev/null
}

start=$(date +%s)
run_engine hf-cb 60
run_engine hf 90
echo "done in $(( $(date +%s) - start )) s; results in $OUT"
