# What the CPU benchmark scripts share; source it after setting HERE (the repository root).
PY=${PYTHON:-$HERE/.venv/bin/python}
# The built-in tiny model's directory (written on first use), for the peer and the client's tokenizer.
TINY=$(cd "$HERE" && "$PY" -c "from pathlib import Path; from tripod.engines.tiny import ensure_tiny_model; print(ensure_tiny_model(Path.home() / '.cache' / 'tripod'))")

# serve_peer PORT [FLAGS...]: `transformers serve` on the tiny model in the foreground, as the issue runs it
# (CPU, 512 KV blocks, 1024 tokens per step); FLAGS (e.g. --continuous-batching, --cb-max-batch-tokens 256)
# come last and override.
serve_peer() {
    local port=$1; shift
    cd "$HERE" && exec "$PY" -m transformers.cli.transformers serve "$TINY" --device cpu --port "$port" \
        --cb-num-blocks 512 --cb-max-batch-tokens 1024 "$@"
}
