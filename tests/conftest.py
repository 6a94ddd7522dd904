"""Shared fixtures: the real tiny model in-process, and a real daphne on a free port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A daphne process serving ``tripod.asgi:application``; ``url`` is its base URL."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log = ROOT / "var" / f"daphne-{self.port}.log"
        self.log.parent.mkdir(exist_ok=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "tripod.asgi:application"],
            cwd=ROOT,
            env=full_env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daphne exited: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"daphne did not start: {self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log_file.close()


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    """One daphne for the session, on the embedded defaults (inline worker, tiny model)."""
    live = LiveServer({"TRIPOD_MAX_BODY_BYTES": "65536", "TRIPOD_WS_MAX_INFLIGHT": "4"})
    try:
        live.wait_ready()
        # Warm the model so that the first test does not pay for loading it.
        httpx.post(
            live.url + "/v1/completions", json={"prompt": "warm", "max_tokens": 1}, timeout=120
        ).raise_for_status()
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def chat_model():
    """The in-process engine the inline worker of this test process uses."""
    from tripod.engines import get_chat_model

    return get_chat_model()


def chat_body(content: str = "Hello there, how are you?", **params) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **params}


def sse_events(raw: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in raw.split("\n") if line.startswith("data: ")]


def sse_json(raw: str) -> list[dict]:
    return [json.loads(data) for data in sse_events(raw) if data != "[DONE]"]
