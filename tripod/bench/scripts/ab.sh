#!/usr/bin/env bash
# Interleaved A/B on a noisy machine: every server is started first and kept up, then each round runs the
# same SSE load on each in turn, so that machine noise lands on all of them alike. Prints per-server medians,
# including the CPU time of each server's main thread (its event loop) per streamed token: under load the loop
# holds the GIL that the engine's batching thread needs, and this figure is steadier than throughput here.
#
# Usage: tripod/bench/scripts/ab.sh OUT_DIR ROUNDS SPEC [SPEC...]
#   SPEC is "DIR|ENV": a checkout (e.g. a `git worktree` of the commit to compare) and environment
#   assignments for its server (TRIPOD_ENGINE defaults to hf-cb), or "PEER|FLAGS" for `transformers serve
#   --continuous-batching` on the same tiny model (FLAGS, e.g. "--cb-max-batch-tokens 256", override its
#   defaults here). C (16), N (48) and TRANSPORT (sse; ws, rest) set concurrency, requests and transport.
# Example: git worktree add /tmp/base HEAD~1 && tripod/bench/scripts/ab.sh var/ab 5 "/tmp/base|" ".|" "PEER|"
set -uo pipefail
HERE=$(cd "$(dirname "$0")/../../.." && pwd)
OUT=${1:?usage: tripod/bench/scripts/ab.sh OUT_DIR ROUNDS SPEC...}; ROUNDS=${2:?rounds}; shift 2
mkdir -p "$OUT"
source "$HERE/tripod/bench/scripts/common.sh"
LOAD=(--transport "${TRANSPORT:-sse}" --prompt-len 128 --output-len 128 --no-progress --tokenizer "$TINY")
export TRIPOD_LOG_LEVEL=WARNING HF_HUB_OFFLINE=1
pids=(); ports=(); declare -A peer; i=0
for spec in "$@"; do
    dir=${spec%%|*}; envs=${spec#*|}; port=$((8720 + i))
    if [ "$dir" = PEER ]; then
        (serve_peer $port --continuous-batching $envs) >"$OUT/server$i.log" 2>&1 &
        peer[$i]=1
    else
        db=$(mktemp -d)/db.sqlite3
        (cd "$dir" && TRIPOD_DB_PATH=$db "$PY" manage.py migrate --noinput -v 0 &&
            exec env TRIPOD_DB_PATH="$db" TRIPOD_ENGINE="${TRIPOD_ENGINE:-hf-cb}" TRIPOD_SLOTS=64 $envs \
            "$PY" -m daphne -b 127.0.0.1 -p $port --access-log /dev/null tripod.asgi:application) >"$OUT/server$i.log" 2>&1 &
    fi
    pids+=($!); ports+=($port); i=$((i + 1))
done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
extra() { if [ -n "${peer[$1]:-}" ]; then echo "--model $TINY --no-ignore-eos"; fi; }
for j in "${!ports[@]}"; do
    path=readyz; [ -n "${peer[$j]:-}" ] && path=health
    for _ in $(seq 240); do curl -sf "http://127.0.0.1:${ports[$j]}/$path" >/dev/null && break; sleep 0.5; done
    (cd "$HERE" && "$PY" -m tripod.bench --url "http://127.0.0.1:${ports[$j]}" --concurrency 16 --num-requests 32 \
        "${LOAD[@]}" $(extra $j) >/dev/null)  # warm-up, not counted
done
loop_ticks() { awk '{print $14 + $15}' "/proc/$1/task/$1/stat"; }  # user + system clock ticks of the main thread
for r in $(seq "$ROUNDS"); do
    for j in "${!ports[@]}"; do
        before=$(loop_ticks "${pids[$j]}")
        (cd "$HERE" && "$PY" -m tripod.bench --url "http://127.0.0.1:${ports[$j]}" --concurrency "${C:-16}" \
            --num-requests "${N:-48}" "${LOAD[@]}" --out "$OUT/s$j-r$r.json" $(extra $j) >/dev/null)
        echo $(( $(loop_ticks "${pids[$j]}") - before )) >"$OUT/s$j-r$r.ticks"
    done
done
"$PY" - "$OUT" "$(getconf CLK_TCK)" "$@" <<'PY'
import glob, json, statistics, sys

out, hz, specs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for j, spec in enumerate(specs):
    files = sorted(glob.glob(f"{out}/s{j}-r*.json"))
    runs = [json.load(open(f)) for f in files]
    tput = [r["output_throughput"] for r in runs]
    ttft = [r["median_ttft_ms"] for r in runs]
    loop = [
        1000 * int(open(f[: -len(".json")] + ".ticks").read()) / hz / max(r["total_output_tokens"], 1)
        for f, r in zip(files, runs)
    ]
    print(
        f"{spec or '.'}: tok/s median {statistics.median(tput):.0f} {[round(x) for x in tput]}, "
        f"median TTFT {statistics.median(ttft):.0f} ms, loop CPU {statistics.median(loop):.3f} ms/token "
        f"{[round(x, 3) for x in loop]}, failed {sum(r['failed'] for r in runs)}"
    )
PY
