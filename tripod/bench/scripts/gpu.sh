#!/usr/bin/env bash
# GPU benchmark: the server with a random-weight Llama-3.2-1B-shaped model (bf16, no download), 1, 16 and 64
# concurrent SSE streams of 128-token prompts and 128 output tokens. In this order, so that a device call that runs
# out of time loses the least:
#   0. python -m tripod.bench.gpu_checks: hf-cb's sampling under captured CUDA graphs, each sampling chain's cost,
#      and masked attention's cost each way (checks.json; GPU_CHECKS="attention_cost ..." picks some);
#   1. hf-cb through the server (CONCURRENCY, greedy as vLLM's bench; then SAMPLED_CONCURRENCY at temperature 1),
#      then in-process (--direct, DIRECT_CONCURRENCY) for the overhead ratio;
#   2. hf-cb variants (VARIANTS, default "splitkeys stream1 forcegqa"), each on servers of their own, at 1 and
#      VARIANT_CONCURRENCY streams unless said:
#      splitkeys: TRIPOD_CB_SPLIT_KEYS=SPLIT_KEYS (default 1024), attention's keys in chunks run as one batch
#        (--direct, then the server, at VARIANT_CONCURRENCY only);
#      stream1: TRIPOD_STREAM_INTERVAL=1, every token its own chunk at any load (at VARIANT_CONCURRENCY only; the
#        default, auto, sends chunks of 4 at 64 streams);
#      forcegqa: TRIPOD_CB_PACKED_GQA=0 TRANSFORMERS_SDPA_FORCE_GQA=1, SDPA's own grouped-query mode with a mask
#        (--direct at VARIANT_CONCURRENCY only);
#      nopackedgqa: TRIPOD_CB_PACKED_GQA=0, transformers' copies of the keys and values for each query head;
#      scaled: the engine in a process of its own (python -m asgi_worker) behind Redis; REDIS_SERVER names the
#        binary (default: redis-server, else the one that gpu_wheels.sh packs);
#      kvpad16384: TRIPOD_CB_KV_PADDING=0, transformers' own padding of attention to 16,384 cached tokens;
#   3. short --direct runs under torch.profiler (PROFILE_CONCURRENCY; PROFILE_ENV="ENV=VALUE ..." sets options),
#      tables in OUT/profile-direct-cC.txt;
#   4. hf through the server (HF_CONCURRENCY).
# Usage: tripod/bench/scripts/gpu.sh OUT_DIR   (JSON per run in OUT_DIR, plus logs; about 7 minutes on an H100
# without hf; it runs from the repository root, so a relative OUT_DIR lies under it)
# Override MODEL=random:path.json, CONCURRENCY="1 16 64", SAMPLED_CONCURRENCY="1 64", DIRECT_CONCURRENCY="1 64",
# VARIANTS="splitkeys stream1 forcegqa nopackedgqa scaled kvpad16384", VARIANT_CONCURRENCY=64,
# PROFILE_CONCURRENCY="1 64" or HF_CONCURRENCY="1 16" ("" skips one) to change the load; PYTHON picks the
# interpreter. A device returns few files: pack OUT_DIR (tar) into its folder.
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUT=${1:?usage: tripod/bench/scripts/gpu.sh OUT_DIR}
mkdir -p "$OUT"
PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-random:tripod/bench/llama-3.2-1b.json}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
SAMPLED_CONCURRENCY=${SAMPLED_CONCURRENCY-"1 64"}
HF_CONCURRENCY=${HF_CONCURRENCY-"1 16"}
VARIANTS=${VARIANTS-"splitkeys stream1 forcegqa"}
SPLIT_KEYS=${SPLIT_KEYS:-1024}
GPU_CHECKS=${GPU_CHECKS:-}
VARIANT_CONCURRENCY=${VARIANT_CONCURRENCY:-64}
DIRECT_CONCURRENCY=${DIRECT_CONCURRENCY-"1 64"}
PROFILE_CONCURRENCY=${PROFILE_CONCURRENCY-"1 64"}
PROFILE_ENV=${PROFILE_ENV:-}
PORT=${PORT:-8765}
REDIS_SERVER=${REDIS_SERVER:-$(command -v redis-server || echo .whl/redis/redis-server)}
export HF_HUB_OFFLINE=1 TRIPOD_MODEL="$MODEL" TRIPOD_SLOTS=64 TRIPOD_LOG_LEVEL=WARNING
export TRIPOD_DB_PATH="$OUT/db.sqlite3"
"$PYTHON" manage.py migrate --noinput -v 0

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)

bench() {  # name concurrency budget [extra args]: one run, its JSON in OUT/name-cC.json, a summary line
    local name=$1 c=$2 budget=$3 n; shift 3
    # One wave for the slow engine, several for the batching one; each run has a time budget.
    [ "$name" = "hf" ] && n=$c || n=$(( c < 8 ? 8 : 4 * c ))
    timeout "$budget" "$PYTHON" -m tripod.bench --transport sse --concurrency "$c" --num-requests "$n" \
        --prompt-len 128 --output-len 128 --warmup 2 --no-progress --label "$name c=$c $gpu_name" \
        --out "$OUT/$name-c$c.json" "$@" >/dev/null \
        || echo "{\"name\": \"$name\", \"concurrency\": $c, \"error\": \"failed or timed out after ${budget}s\"}" \
            >"$OUT/$name-c$c.json"
    echo "$name c=$c: $("$PYTHON" -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d.get(k) for k in ('output_throughput', 'median_ttft_ms', 'median_itl_ms', 'failed', 'error')})" "$OUT/$name-c$c.json")"
}

run_server() {  # name "ENV=VALUE ..." "CONCURRENCIES" budget [extra bench args]: one server, its runs
    # SAMPLED="CONCURRENCIES" adds runs at temperature 1 (seeded noise on every token) as name-t1.
    local name=$1 envs=$2 levels=$3 budget=$4 sampled=${SAMPLED:-}; shift 4
    env $envs "$PYTHON" -m daphne -b 127.0.0.1 -p "$PORT" tripod.asgi:application >"$OUT/server-$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
        sleep 1
    done
    for c in $levels; do bench "$name" "$c" "$budget" --url "http://127.0.0.1:$PORT" "$@"; done
    for c in $sampled; do bench "$name-t1" "$c" "$budget" --url "http://127.0.0.1:$PORT" --temperature 1 "$@"; done
    kill "$pid"; wait "$pid" 2>/dev/null
}

run_scaled() {  # name "ENV=VALUE ..." "CONCURRENCIES" budget: Redis, a python -m asgi_worker, a daphne, their runs
    local name=$1 envs=$2 levels=$3 budget=$4 url="redis://127.0.0.1:$((PORT + 1))/0"; shift 4
    LD_LIBRARY_PATH="$(dirname "$REDIS_SERVER")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$REDIS_SERVER" \
        --port $((PORT + 1)) --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis-$name.log" 2>&1 &
    local redis=$!
    env $envs REDIS_URL="$url" "$PYTHON" -m asgi_worker --slots 64 >"$OUT/worker-$name.log" 2>&1 &
    local worker=$!
    run_server "$name" "$envs REDIS_URL=$url" "$levels" "$budget"
    kill "$worker"; wait "$worker" 2>/dev/null
    kill "$redis"; wait "$redis" 2>/dev/null
}

start=$(date +%s)
timeout 120 "$PYTHON" -m tripod.bench.gpu_checks "$OUT/checks.json" $GPU_CHECKS >"$OUT/checks.log" 2>&1 \
    && echo "checks: $OUT/checks.json" || echo "checks: failed or timed out (checks.log)"
SAMPLED=$SAMPLED_CONCURRENCY run_server hf-cb TRIPOD_ENGINE=hf-cb "$CONCURRENCY" 60
for c in $DIRECT_CONCURRENCY; do bench direct-hf-cb "$c" 90 --direct --engine hf-cb --slots 64; done
for variant in $VARIANTS; do
    case $variant in
        kvpad16384) run_server hf-cb-kvpad16384 "TRIPOD_ENGINE=hf-cb TRIPOD_CB_KV_PADDING=0" "1 $VARIANT_CONCURRENCY" 60 ;;
        splitkeys)
            TRIPOD_CB_SPLIT_KEYS=$SPLIT_KEYS bench direct-hf-cb-splitkeys "$VARIANT_CONCURRENCY" 90 --direct \
                --engine hf-cb --slots 64
            run_server hf-cb-splitkeys "TRIPOD_ENGINE=hf-cb TRIPOD_CB_SPLIT_KEYS=$SPLIT_KEYS" "$VARIANT_CONCURRENCY" 60 ;;
        stream1) run_server hf-cb-stream1 "TRIPOD_ENGINE=hf-cb TRIPOD_STREAM_INTERVAL=1" "$VARIANT_CONCURRENCY" 60 ;;
        forcegqa)
            TRIPOD_CB_PACKED_GQA=0 TRANSFORMERS_SDPA_FORCE_GQA=1 bench direct-hf-cb-forcegqa "$VARIANT_CONCURRENCY" 90 \
                --direct --engine hf-cb --slots 64 ;;
        nopackedgqa) run_server hf-cb-nopackedgqa "TRIPOD_ENGINE=hf-cb TRIPOD_CB_PACKED_GQA=0" "1 $VARIANT_CONCURRENCY" 60 ;;
        scaled) run_scaled hf-cb-scaled "TRIPOD_ENGINE=hf-cb" "1 $VARIANT_CONCURRENCY" 60 ;;
        *) echo "unknown variant $variant" ;;
    esac
done
# A few requests each (the profiler slows the run): where a step's time goes, on the device and on the host.
for c in $PROFILE_CONCURRENCY; do
    env $PROFILE_ENV timeout 90 "$PYTHON" -m tripod.bench --direct --engine hf-cb --slots 64 --concurrency "$c" \
        --num-requests "$c" --prompt-len 128 --output-len 128 --warmup 2 --no-progress \
        --profile "$OUT/profile-direct-c$c.txt" --out "$OUT/profile-direct-c$c.json" >/dev/null \
        && echo "profile c=$c: $OUT/profile-direct-c$c.txt" || echo "profile c=$c: failed or timed out"
done
# Last, since it changes least and a device call that runs out of time cuts the end: hf cannot finish 64 streams in
# any useful time on a GPU (docs/BENCHMARKS.md, "Third H100 run"), so each request gets 40 s, and the run still
# writes its JSON (completed and failed counts) instead of being killed; one warm-up.
[ -n "$HF_CONCURRENCY" ] && run_server hf TRIPOD_ENGINE=hf "$HF_CONCURRENCY" 75 --timeout 40 --warmup 1
echo "done in $(( $(date +%s) - start )) s; results in $OUT"
