#!/usr/bin/env bash
# CPU comparison on the tiny model, all driven by the same client (python -m tripod.bench) in one run:
#   Tripod hf and hf-cb against `transformers serve` (with and without continuous batching) at concurrency 16,
#   a concurrency sweep of Tripod's two engines (for the plot), and the server-overhead ratio (--direct).
# Usage: tripod/bench/scripts/cpu_compare.sh OUT_DIR    (needs: pip install -r requirements-bench.txt)
set -uo pipefail
cd "$(dirname "$0")/../../.."
HERE=$(pwd)
source tripod/bench/scripts/common.sh
OUT=${1:?usage: tripod/bench/scripts/cpu_compare.sh OUT_DIR}
mkdir -p "$OUT"
LOAD=(--transport sse --prompt-len 128 --output-len 128 --warmup 2 --no-progress --tokenizer "$TINY")
export TRIPOD_DB_PATH="$(mktemp -d)/db.sqlite3" TRIPOD_LOG_LEVEL=WARNING HF_HUB_OFFLINE=1
LOGS=$(mktemp -d)
"$PY" manage.py migrate --noinput -v 0

wait_up() { for _ in $(seq 120); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done; return 1; }

bench() {  # name url concurrency requests [extra args]
    local name=$1 url=$2 c=$3 n=$4; shift 4
    "$PY" -m tripod.bench --url "$url" --concurrency "$c" --num-requests "$n" "${LOAD[@]}" --label "$name" \
        --out "$OUT/$name-c$c.json" "$@" >/dev/null
    "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], {k: round(d[k], 1) for k in ('output_throughput','median_ttft_ms','median_itl_ms','p99_ttft_ms')}, 'failed', d['failed'])" "$OUT/$name-c$c.json" "$name c=$c"
}

tripod() {  # engine port
    TRIPOD_ENGINE=$1 TRIPOD_SLOTS=64 "$PY" -m daphne -b 127.0.0.1 -p "$2" --access-log /dev/null tripod.asgi:application \
        >"$LOGS/server-tripod-$1.log" 2>&1 &
    echo $!
}

for engine in hf hf-cb; do
    pid=$(tripod "$engine" 8711)
    wait_up http://127.0.0.1:8711/readyz || wait_up http://127.0.0.1:8711/readyz
    for c in 1 4 16 32; do bench "tripod-$engine" http://127.0.0.1:8711 "$c" $(( c < 4 ? 16 : 3 * c )); done
    kill "$pid"; wait "$pid" 2>/dev/null
    # The same load on the engine in-process, for the server-overhead ratio.
    for c in 1 16; do bench "direct-$engine" http://unused "$c" $(( c < 4 ? 16 : 3 * c )) --direct --engine "$engine" --slots 64; done
    # Without ignore_eos, as the peer must be run (it refuses the field); greedy gives the same 128 tokens.
    pid=$(tripod "$engine" 8711)
    wait_up http://127.0.0.1:8711/readyz || wait_up http://127.0.0.1:8711/readyz
    bench "tripod-$engine-no-ignore-eos" http://127.0.0.1:8711 16 48 --no-ignore-eos
    kill "$pid"; wait "$pid" 2>/dev/null
done

# The peer as the issue runs it (512 blocks, 1024 tokens per step), with Tripod's CPU step size (256), and without
# continuous batching.
for run in "continuous-batching|--continuous-batching" \
    "continuous-batching-256|--continuous-batching --cb-max-batch-tokens 256" \
    "no-continuous-batching|--no-continuous-batching"; do
    name=peer-${run%%|*}; mode=${run#*|}
    (serve_peer 8712 $mode) >"$LOGS/server-$name.log" 2>&1 &
    pid=$!
    wait_up http://127.0.0.1:8712/health
    bench "$name" http://127.0.0.1:8712 16 48 --model "$TINY" --no-ignore-eos
    kill "$pid"; wait "$pid" 2>/dev/null
done
echo "results in $OUT, server logs in $LOGS"
