#!/usr/bin/env bash
# What the test suite needs beyond .venv, so that `make test` passes on a fresh machine by itself:
# redis-server (one answering on 127.0.0.1:6379), Debian's chromium (the chat page tests) and PostgreSQL's
# server (the DATABASE_URL tests start private clusters with it, as the scaled tests do with redis-server).
# Missing packages are installed with apt-get, as root (or through sudo). TRIPOD_INSTALL replaces that
# command, e.g. to see what it would install; TRIPOD_PG_BINDIR names where initdb is when not Debian's.
set -euo pipefail

apt_install() {
    local root=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "test-services: as root, run: apt-get install $*" >&2; exit 1; }
        root=(sudo)
    fi
    # Another apt-get (unattended upgrades, a parallel install) may hold the lock: wait for it.
    "${root[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
    "${root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@"
}

has_postgres() {
    if [ -n "${TRIPOD_PG_BINDIR:-}" ]; then
        [ -x "$TRIPOD_PG_BINDIR/initdb" ]
    else
        command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
    fi
}

missing() {
    command -v redis-server >/dev/null || echo redis-server
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null || echo chromium
    has_postgres || echo postgresql
}

needed=$(missing)
if [ -n "$needed" ]; then
    # shellcheck disable=SC2086 # one word per package
    ${TRIPOD_INSTALL:-apt_install} $needed
    still=$(missing)
    if [ -n "$still" ]; then
        echo "test-services: still missing after installing: $still" >&2
        exit 1
    fi
fi

redis_up() {
    python3 - <<'PY'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", 6379), timeout=1)
    s.sendall(b"PING\r\n")
    sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}

if ! redis_up; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ""
    for _ in $(seq 50); do redis_up && break; sleep 0.1; done
    redis_up || { echo "test-services: redis-server did not start on 127.0.0.1:6379" >&2; exit 1; }
fi
