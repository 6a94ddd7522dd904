"""Deployment: `make test` brings what it needs on a fresh machine, and scaled web processes share PostgreSQL.

The PostgreSQL is a real private cluster (``PostgresServer``), the web processes real daphnes, the worker a real
``python -m asgi_worker``. Only the package manager is replaced, by a recorder: installing is outside the system.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import httpx
import psycopg
import pytest

from tests.conftest import chat_body
from tests.processes import ROOT, PostgresServer, create_key, manage

SERVICES = ROOT / "scripts" / "test-services.sh"


def run_services(tmp_path, path: str, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the services script with a recording install command; return its result and what it asked for."""
    record = tmp_path / "installed"
    recorder = tmp_path / "fake-install"
    recorder.write_text(f'#!{shutil.which("bash")}\necho "$@" >> {record}\n')
    recorder.chmod(0o755)
    result = subprocess.run(
        [shutil.which("bash"), str(SERVICES)],
        env={**os.environ, "PATH": path, "TRIPOD_INSTALL": str(recorder), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, record.read_text() if record.exists() else ""


def test_services_install_what_a_fresh_machine_lacks(tmp_path):
    """A PATH without redis-server, chromium or PostgreSQL: the script asks to install all three, and fails loudly
    when they are still missing after that, instead of letting the suite error out later."""
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("python3", "id", "env", "seq", "sleep"):
        (bare / tool).symlink_to(shutil.which(tool))
    result, installed = run_services(tmp_path, str(bare), TRIPOD_PG_BINDIR=str(tmp_path / "no-postgres"))
    assert installed.split() == ["redis-server", "chromium", "postgresql"], installed
    assert result.returncode != 0
    assert "still missing after installing: redis-server" in result.stderr


def test_services_install_nothing_when_all_is_there(tmp_path):
    """On this machine (the services step has run) nothing is installed, and Redis answers on 6379."""
    result, installed = run_services(tmp_path, os.environ["PATH"])
    assert result.returncode == 0, result.stderr
    assert installed == ""


def test_the_readme_test_command_is_what_ci_runs():
    """`.ci/run` is `make test`, and `make test` runs the services step before pytest."""
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert commands[-1] == "exec make test"
    assert all(re.match(r"(set |cd )", line) for line in commands[:-1]), commands
    assert "make test" in (ROOT / "README.md").read_text()
    plan = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert plan.index("scripts/test-services.sh") < plan.index("pytest")


@pytest.fixture
def postgres():
    """A private PostgreSQL cluster for one test; it fails (never skips) where PostgreSQL is not installed."""
    with PostgresServer() as server:
        yield server


def usage_of(url: str, key: str) -> dict:
    response = httpx.get(url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    return data[0] if data else {"requests": 0, "completion_tokens": 0}


def wait_for_usage(url: str, key: str, requests: int) -> dict:
    deadline = time.monotonic() + 30
    while (usage := usage_of(url, key))["requests"] < requests and time.monotonic() < deadline:
        time.sleep(0.1)
    return usage


def test_scaled_web_processes_share_keys_and_usage_in_postgresql(postgres, cluster):
    """Migrations run on PostgreSQL; a key made with `manage.py tripod_keys` works on two web processes, and the
    usage one records is what the other reports."""
    migrate = manage(postgres.url, "migrate", "--noinput", "-v", "0")
    assert migrate.returncode == 0, migrate.stderr
    with psycopg.connect(postgres.url) as db:
        applied = {app for (app,) in db.execute("SELECT DISTINCT app FROM django_migrations")}
    assert {"tripod", "training", "auth", "sessions"} <= applied
    key = create_key(postgres.url, "shared")

    # Workers need no database: only the web processes are told where it is.
    (first, second), _ = cluster.start(
        webs=2, worker=["--slots", "2"], DATABASE_URL=postgres.url, TRIPOD_NO_WORKER_WAIT="30"
    )
    assert httpx.get(first.url + "/readyz").json()["status"] == "ready"
    bearer = {"Authorization": f"Bearer {key}"}
    for web in (first, second):
        denied = httpx.post(web.url + "/v1/chat/completions", json=chat_body(max_tokens=1), timeout=60)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"

    reply = httpx.post(first.url + "/v1/chat/completions", json=chat_body(max_tokens=3), headers=bearer, timeout=60)
    assert reply.status_code == 200, reply.text
    usage = wait_for_usage(second.url, key, 1)
    assert (usage["requests"], usage["completion_tokens"]) == (1, 3)

    reply = httpx.post(second.url + "/v1/chat/completions", json=chat_body(max_tokens=2), headers=bearer, timeout=60)
    assert reply.status_code == 200, reply.text
    usage = wait_for_usage(first.url, key, 2)
    assert (usage["requests"], usage["completion_tokens"]) == (2, 5)
