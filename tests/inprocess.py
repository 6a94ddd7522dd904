"""Drive the real ASGI application in the test's own event loop, where the engine can be watched."""

from __future__ import annotations

import asyncio
import json
import time

from channels.testing import ApplicationCommunicator


def http_scope(path: str, body: bytes, method: str = "POST") -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


class HTTPExchange:
    """One HTTP request to the ASGI app whose response body is read piece by piece."""

    def __init__(self, app, path: str, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.communicator = ApplicationCommunicator(app, http_scope(path, body))
        self.body = body
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.received = b""
        self.complete = False

    async def start(self, timeout: float = 30) -> int:
        await self.communicator.send_input({"type": "http.request", "body": self.body, "more_body": False})
        start = await self.communicator.receive_output(timeout)
        assert start["type"] == "http.response.start"
        self.status = start["status"]
        self.headers = dict(start["headers"])
        return self.status

    async def read(self, timeout: float = 30) -> bytes:
        message = await self.communicator.receive_output(timeout)
        assert message["type"] == "http.response.body"
        self.received += message.get("body", b"")
        if not message.get("more_body", False):
            self.complete = True
        return message.get("body", b"")

    async def read_until(self, marker: bytes, timeout: float = 30) -> bytes:
        while marker not in self.received and not self.complete:
            await self.read(timeout)
        return self.received

    async def read_all(self, timeout: float = 30) -> bytes:
        while not self.complete:
            await self.read(timeout)
        return self.received

    async def disconnect(self) -> None:
        await self.communicator.send_input({"type": "http.disconnect"})
        await self.communicator.wait(10)


async def wait_for(predicate, timeout: float = 10, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.01)
