#!/usr/bin/env bash
# Wheels for a GPU machine that reaches no package index (the device of docs/BENCHMARKS.md, "GPU"): what the
# server needs from requirements.txt and the bench's clients from requirements-dev.txt, for that machine's Python,
# plus py-spy and redis-server (below). Left out: torch and what comes with it (that machine has a CUDA build; a
# CUDA stack is gigabytes), numpy, and the training leg's extras. About 57 MB, under what a device command may carry.
# Here:  tripod/bench/scripts/gpu_wheels.sh [DIR] [PYTHON_VERSION]     (defaults: .whl and 3.12)
# There: python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#        PYTHONPATH=/tmp/site PYTHON=python3 tripod/bench/scripts/gpu.sh /tmp/gpu; tar czf $OUT/gpu.tgz -C /tmp gpu
set -euo pipefail
cd "$(dirname "$0")/../../.."
DIR=${1:-.whl}; VERSION=${2:-3.12}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
serving="$DIR/serving-requirements.txt"
grep -v -E '^(torch|peft|accelerate|matplotlib)\b' requirements.txt >"$serving"
# The bench's clients (python -m tripod.bench): without websockets it does not start.
grep -E '^(websockets|httpx)\b' requirements-dev.txt >>"$serving"
"$PY" -m pip download -q --dest "$DIR" --only-binary=:all: --python-version "$VERSION" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform linux_x86_64 -r "$serving" py-spy
rm "$serving"
# transformers names torch and numpy as dependencies; the machine's own builds serve (--no-deps there).
for skip in torch nvidia_ triton numpy sympy networkx mpmath; do rm -f "$DIR/$skip"*.whl; done
# Redis for the scaled variant of gpu.sh (the engine in a process of its own): this machine's redis-server and the
# libraries of it that a stock Ubuntu lacks, if there is one here.
if server=$(command -v redis-server); then
    mkdir -p "$DIR/redis"
    cp "$(readlink -f "$server")" "$DIR/redis/redis-server"
    ldd "$server" | awk '/liblzf|libjemalloc|libatomic/ {print $3}' | xargs -r cp -t "$DIR/redis"
fi
du -sh "$DIR"
