"""The three ways a client talks to the server, each timing one request into a ``RequestResult``.

SSE and REST go through one shared ``httpx.AsyncClient`` (a connection per concurrent client); WebSocket
clients keep one socket each and reuse it across their requests, reconnecting after a failure.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import websockets

from tripod.bench.metrics import RequestResult

TRANSPORTS = ("sse", "ws", "rest")
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Target:
    """Where the load goes and what every request asks for."""

    url: str
    model: str | None
    output_len: int
    ignore_eos: bool
    temperature: float
    seed: int | None
    api_key: str | None
    timeout: float
    ws_path: str = "/ws/chat/"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, prompt: str, index: int) -> dict[str, Any]:
        """The chat request body shared by every transport (WebSocket adds its frame fields)."""
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.output_len,
            "temperature": self.temperature,
        }
        if self.model:
            body["model"] = self.model
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.seed is not None and self.temperature > 0:
            body["seed"] = self.seed + index
        return body

    @property
    def ws_url(self) -> str:
        base = self.url.rstrip("/")
        if base.startswith("https://"):
            base = "wss://" + base[len("https://") :]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://") :]
        return base + self.ws_path


def describe(exc: BaseException) -> str:
    """A one-line error message for the JSON: the exception type and text, kept short."""
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:MAX_ERROR_CHARS]


def http_error(response: httpx.Response, body: bytes) -> str:
    """``HTTP 400: <message>`` from an OpenAI-shaped error body, or the start of whatever came back."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")
    return f"HTTP {response.status_code}: {message}"[:MAX_ERROR_CHARS]


def apply_usage(result: RequestResult, usage: dict[str, Any] | None) -> None:
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.output_tokens = int(usage.get("completion_tokens") or 0)
    else:
        # A server that sends no usage: count pieces of text, and say so in the summary.
        result.usage_missing = True
        result.output_tokens = result.content_pieces


class TextTimer:
    """Stamps each piece of text as it arrives: the first gives TTFT, the rest the inter-token gaps."""

    def __init__(self, result: RequestResult) -> None:
        self.result = result
        self.start = time.perf_counter()
        self.last: float | None = None

    def text(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.result.ttft = now - self.start
        else:
            self.result.itl.append(now - self.last)
        self.last = now
        self.result.content_pieces += 1

    def finish(self) -> None:
        self.result.e2el = time.perf_counter() - self.start


class HTTPClient:
    """SSE and REST requests over a shared connection pool."""

    def __init__(self, target: Target, http: httpx.AsyncClient, stream: bool) -> None:
        self.target = target
        self.http = http
        self.stream = stream
        self.endpoint = target.url.rstrip("/") + "/v1/chat/completions"

    async def close(self) -> None:
        """Nothing per client: the pool belongs to the run."""

    async def request(self, prompt: str, index: int) -> RequestResult:
        result = RequestResult(streamed=self.stream)
        timer = TextTimer(result)
        try:
            async with asyncio.timeout(self.target.timeout):
                if self.stream:
                    await self._sse(prompt, index, result, timer)
                else:
                    await self._rest(prompt, index, result)
        except Exception as exc:  # noqa: BLE001 - every failure is a counted result, never a crash
            result.ok, result.error = False, describe(exc)
        timer.finish()
        if result.ok and not self.stream:
            result.ttft = result.e2el  # not streamed: the first token arrives with the last
        return result

    async def _rest(self, prompt: str, index: int, result: RequestResult) -> None:
        response = await self.http.post(self.endpoint, json=self.target.body(prompt, index))
        if response.status_code != 200:
            result.error = http_error(response, response.content)
            return
        data = response.json()
        result.content_pieces = 1
        apply_usage(result, data.get("usage"))
        result.ok = True

    async def _sse(self, prompt: str, index: int, result: RequestResult, timer: TextTimer) -> None:
        body = {**self.target.body(prompt, index), "stream": True, "stream_options": {"include_usage": True}}
        async with self.http.stream("POST", self.endpoint, json=body) as response:
            if response.status_code != 200:
                result.error = http_error(response, await response.aread())
                return
            usage = None
            finished = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    apply_usage(result, usage)
                    result.ok = True
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message')}"[:MAX_ERROR_CHARS]
                    return
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        timer.text()
                    finished = finished or bool(choice.get("finish_reason"))
                usage = chunk.get("usage") or usage
            if finished:
                # Some servers (transformers serve) end after the finish_reason chunk without [DONE].
                apply_usage(result, usage)
                result.ok = True
                return
            result.error = "the stream ended without data: [DONE]"


class WebSocketClient:
    """One socket on ``/ws/chat/`` per concurrent client, reused for its requests in turn."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.socket: websockets.ClientConnection | None = None

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
            self.socket = None

    async def request(self, prompt: str, index: int) -> RequestResult:
        result = RequestResult()
        timer = TextTimer(result)
        try:
            async with asyncio.timeout(self.target.timeout):
                if self.socket is None:
                    self.socket = await websockets.connect(
                        self.target.ws_url, additional_headers=self.target.headers(), max_size=None
                    )
                await self._chat(prompt, index, result, timer)
        except Exception as exc:  # noqa: BLE001 - every failure is a counted result, never a crash
            result.ok, result.error = False, describe(exc)
            # The socket may be mid-reply or dead: start the next request on a fresh one.
            socket, self.socket = self.socket, None
            if socket is not None:
                await socket.close()
        timer.finish()
        return result

    async def _chat(self, prompt: str, index: int, result: RequestResult, timer: TextTimer) -> None:
        request_id = str(index)
        await self.socket.send(json.dumps({"type": "chat", "id": request_id, **self.target.body(prompt, index)}))
        while True:
            frame = json.loads(await self.socket.recv())
            if frame.get("id") != request_id:
                if frame.get("type") == "error" and frame.get("id") is None:
                    result.error = f"error frame: {frame['error'].get('message')}"[:MAX_ERROR_CHARS]
                    return
                continue
            kind = frame.get("type")
            if kind == "delta":
                if frame.get("text"):
                    timer.text()
            elif kind == "done":
                if frame.get("finish_reason") == "cancelled":
                    result.error = "the server cancelled the request"
                    return
                apply_usage(result, frame.get("usage"))
                result.ok = True
                return
            elif kind == "error":
                result.error = f"error frame: {frame['error'].get('message')}"[:MAX_ERROR_CHARS]
                return
