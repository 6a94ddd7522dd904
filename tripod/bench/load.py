"""Closed-loop load on a server: N concurrent clients send M requests in all, each waiting for its reply.

All clients are coroutines on one event loop in one process, which stays light (its CPU share is in
docs/BENCHMARKS.md, "Reading results on a small machine") so that the server, not the client, is what gets
measured. Requests are handed out in index order from a shared iterator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from tripod.bench.metrics import RequestResult
from tripod.bench.transports import HTTPClient, Target, WebSocketClient, describe


async def default_model(url: str, api_key: str | None, timeout: float = 10) -> tuple[str | None, str | None]:
    """The first id of ``GET /v1/models``, or ``None`` and why not."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as http:
            response = await http.get(url.rstrip("/") + "/v1/models")
            response.raise_for_status()
            return response.json()["data"][0]["id"], None
    except Exception as exc:  # noqa: BLE001 - the run goes on and reports every request's failure
        return None, describe(exc)


async def run_clients(
    target: Target,
    transport: str,
    prompts: list[str],
    concurrency: int,
    on_result: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send every prompt once with ``concurrency`` clients; return results in prompt order and the duration."""
    clients_count = max(1, min(concurrency, len(prompts)))
    limits = httpx.Limits(max_connections=clients_count, max_keepalive_connections=clients_count)
    timeout = httpx.Timeout(target.timeout, connect=min(target.timeout, 30))
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=target.headers()) as http:
        results: list[RequestResult | None] = [None] * len(prompts)
        indexes = iter(range(len(prompts)))

        async def client_loop() -> None:
            if transport == "ws":
                client: HTTPClient | WebSocketClient = WebSocketClient(target)
            else:
                client = HTTPClient(target, http, stream=transport == "sse")
            try:
                for index in indexes:
                    results[index] = result = await client.request(prompts[index], index)
                    if on_result is not None:
                        on_result(result)
            finally:
                await client.close()

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(clients_count)))
        duration = time.perf_counter() - started
    return [result for result in results if result is not None], duration
