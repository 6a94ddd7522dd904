"""Real processes for tests: daphne web servers, ``python -m asgi_worker`` workers, ``redis-server``, a scaled
``Cluster`` of them, PostgreSQL."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import httpx

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "var" / "test-logs"
# Scaled web processes refuse the built-in DJANGO_SECRET_KEY; those of one test run share this one, as a
# deployment's would (a resumable stream's URL signed by one is checked by another).
SECRET_KEY = secrets.token_urlsafe(50)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StoppedOnExit:
    """Something a test starts and must stop: ``with`` stops it at the end of the block, however the block ends."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        raise NotImplementedError


class Process(StoppedOnExit):
    """A child process whose output goes to a log file under var/test-logs/."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = LOGS / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log_file.close()


def migrated_database() -> str:
    """A fresh, migrated sqlite file for one server (and the tests that create its keys)."""
    path = Path(tempfile.mkdtemp(prefix="tripod-db-")) / "db.sqlite3"
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env={**os.environ, **database_env(str(path))},
        check=True,
    )
    return str(path)


def database_env(db: str) -> dict[str, str]:
    """The environment that points a process at ``db``: a ``DATABASE_URL`` or a sqlite file's path (then any
    ``DATABASE_URL`` of the test run's own environment is blanked, so that it cannot win)."""
    return {"DATABASE_URL": db} if "://" in db else {"DATABASE_URL": "", "TRIPOD_DB_PATH": db}


def manage(db_path: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``manage.py`` against a test server's database (a sqlite path or a ``DATABASE_URL``)."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **database_env(db_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def create_key(db_path: str, name: str, *flags: str) -> str:
    """A stored API key made with ``manage.py tripod_keys create`` in a test server's database."""
    result = manage(db_path, "tripod_keys", "create", name, *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def procfile_daphne_argv(port: int) -> list[str]:
    """The daphne command of the Procfile's ``web:`` line, on 127.0.0.1:``port``: the tests serve as users do."""
    web = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    argv = shlex.split(web.split("&&")[-1])
    assert argv[0] == "daphne", web
    argv = [arg.replace("${PORT:-8000}", str(port)).replace("0.0.0.0", "127.0.0.1") for arg in argv[1:]]
    return [sys.executable, "-m", "daphne", *argv]


class LiveServer(Process):
    """A daphne serving ``tripod.asgi:application`` on a free port, with its own migrated database
    unless ``env`` names a ``DATABASE_URL``."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(env or {})
        self.db_path = env.get("DATABASE_URL") or env.get("TRIPOD_DB_PATH") or migrated_database()
        env.update(database_env(self.db_path))
        if env.get("REDIS_URL", os.environ.get("REDIS_URL")):
            env.setdefault("DJANGO_SECRET_KEY", SECRET_KEY)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        super().__init__(f"daphne-{self.port}", procfile_daphne_argv(self.port), env)

    def wait_ready(self, timeout: float = 60) -> LiveServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"daphne exited: {self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"daphne did not start: {self.output()}")


class WorkerProcess(Process):
    """``python -m asgi_worker`` with the given flags."""

    def __init__(self, redis_url: str, *flags: str, env: dict[str, str] | None = None) -> None:
        argv = [sys.executable, "-m", "asgi_worker", *flags]
        super().__init__("worker", argv, {"REDIS_URL": redis_url, **(env or {})})

    def wait_serving(self, timeout: float = 60) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while "serving tripod.generate." not in self.output():
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {self.output()}")
            time.sleep(0.1)
        return self

    def finished_jobs(self) -> list[str]:
        """Lines the worker logs when a job ends (``job <id> finished: ...``)."""
        return [line for line in self.output().splitlines() if " finished: finish_reason=" in line]


class RedisServer(StoppedOnExit):
    """A private ``redis-server`` on a free port; ``restart()`` keeps the port, loses the data."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; .ci/run installs it")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="tripod-redis-")
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Cluster(StoppedOnExit):
    """A scaled deployment of one test or module: web processes and workers on a private ``redis``, each web process
    with ``web_env`` unless told otherwise. ``with`` stops them all at the end (a paused one resumed first)."""

    def __init__(self, redis: RedisServer, **web_env: str) -> None:
        self.redis = redis
        self.web_env = web_env
        self.processes: list[Process] = []

    def _web(self, env: dict[str, str]) -> LiveServer:
        server = LiveServer({"REDIS_URL": self.redis.url, **self.web_env, **env})
        self.processes.append(server)
        return server

    def _worker(self, flags: Sequence[str], env: dict[str, str]) -> WorkerProcess:
        worker = WorkerProcess(self.redis.url, *flags, env=env)
        self.processes.append(worker)
        return worker

    def web(self, **env: str) -> LiveServer:
        """One more web process, ready."""
        return self._web(env).wait_ready()

    def worker(self, *flags: str, **env: str) -> WorkerProcess:
        """One more ``python -m asgi_worker`` with ``flags``, serving."""
        return self._worker(flags, env).wait_serving()

    def start(self, webs: int, worker: Sequence[str], **web_env: str) -> tuple[list[LiveServer], WorkerProcess]:
        """``webs`` web processes and one worker with the flags ``worker``, booted side by side and all ready."""
        servers = [self._web(web_env) for _ in range(webs)]
        started = self._worker(worker, {})
        for server in servers:
            server.wait_ready()
        return servers, started.wait_serving()

    def stop(self) -> None:
        for process in self.processes:
            if process.alive():
                process.signal(signal.SIGCONT)  # a paused process takes no SIGTERM until resumed
            process.stop()


def postgres_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: ``TRIPOD_PG_BINDIR``, else ``PATH``, else Debian's newest."""
    if os.environ.get("TRIPOD_PG_BINDIR"):
        return Path(os.environ["TRIPOD_PG_BINDIR"])
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not debian:
        raise RuntimeError("PostgreSQL is not installed; scripts/test-services.sh installs it (make services)")
    return debian[-1].parent


class PostgresServer(StoppedOnExit):
    """A private PostgreSQL cluster on a free port (trust auth, nothing fsynced), like :class:`RedisServer`.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user.
    """

    def __init__(self) -> None:
        bindir = postgres_bindir()
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self.dir = tempfile.mkdtemp(prefix="tripod-pg-")
        self.data = os.path.join(self.dir, "data")
        self._as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_owner:
            shutil.chown(self.dir, "postgres")
        self._pg_ctl = str(bindir / "pg_ctl")
        self._run(str(bindir / "initdb"), "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._run(self._pg_ctl, "start", "-w", "-t", "60", "-D", self.data, "-l", f"{self.dir}/log", "-o", options)

    def _run(self, *argv: str) -> None:
        result = subprocess.run([*self._as_owner, *argv], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout}{result.stderr}")

    def stop(self) -> None:
        subprocess.run([*self._as_owner, self._pg_ctl, "stop", "-m", "immediate", "-D", self.data], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
