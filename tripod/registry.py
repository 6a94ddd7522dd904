"""The worker registry in Redis: who is alive, which models they serve, who owns which job.

Each worker beats ``tripod:worker:<id>`` (a JSON record) with a short TTL; a missing key is a dead
worker. The web tier reads it to list models, to decide readiness, and to notice a worker that died
mid-stream. Job claims (``SET NX``) make sure a job pulled twice is still served once.

Web processes beat ``tripod:web:<id>`` too, from their first generation on, and name themselves in each
job: a worker stops the generations of a web process that died (a crash, ``SIGKILL``, a lost host), which
nobody can read any more, instead of running them to their last token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
import weakref
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tripod.redis_connections import connection_options
from tripod.request_threads import outlive_request

logger = logging.getLogger(__name__)

WORKER_KEY = "tripod:worker:"
WEB_KEY = "tripod:web:"
# This web process, as the jobs it submits name it.
WEB_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
MODELS_KEY = "tripod:models"
CLAIM_KEY = "tripod:claim:"
CLAIM_TTL_MS = 6 * 3600 * 1000

# What a failing Redis raises, for callers that turn it into a 503 or a retry.
RegistryUnavailable = (RedisError, OSError, asyncio.TimeoutError)
# Every request asks which models are live; one Redis scan serves all of them for this long.
WORKERS_CACHE_SECONDS = 0.25


class _LoopState:
    """Per-event-loop client and cached worker list (redis.asyncio objects are loop-bound)."""

    def __init__(self, url: str) -> None:
        # A blocking pool: a burst of requests waits for a connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=2, **connection_options(read_timeout=2)
        )
        self.client = aioredis.Redis(connection_pool=pool)
        self.workers: list[dict[str, Any]] = []
        self.fetched_at = float("-inf")
        self.lock = asyncio.Lock()
        self.web_heartbeat: asyncio.Task | None = None


class WorkerRegistry:
    """Heartbeats and claims; one Redis client per event loop (redis.asyncio clients are loop-bound)."""

    def __init__(self, url: str, ttl: float) -> None:
        self.url = url
        self.ttl_ms = max(int(ttl * 1000), 100)
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState(self.url)
        return state

    @property
    def redis(self) -> aioredis.Redis:
        return self._state().client

    async def beat(self, info: dict[str, Any]) -> None:
        record = json.dumps({**info, "last_beat": time.time()})
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(WORKER_KEY + info["id"], record, px=self.ttl_ms)
            pipe.sadd(MODELS_KEY, info["model"])
            await pipe.execute()

    async def remove(self, worker_id: str) -> None:
        await self.redis.delete(WORKER_KEY + worker_id)

    async def workers(self) -> list[dict[str, Any]]:
        """Live worker records, at most ``WORKERS_CACHE_SECONDS`` old; one fetch at a time per loop."""
        state = self._state()
        if time.monotonic() - state.fetched_at < WORKERS_CACHE_SECONDS:
            return state.workers
        async with state.lock:
            if time.monotonic() - state.fetched_at >= WORKERS_CACHE_SECONDS:
                state.workers = await self._fetch_workers(state.client)
                state.fetched_at = time.monotonic()
        return state.workers

    @staticmethod
    async def _fetch_workers(client: aioredis.Redis) -> list[dict[str, Any]]:
        keys = [key async for key in client.scan_iter(match=WORKER_KEY + "*", count=1000)]
        if not keys:
            return []
        return [json.loads(value) for value in await client.mget(keys) if value is not None]

    async def live_models(self) -> set[str]:
        return {worker["model"] for worker in await self.workers()}

    async def known_models(self) -> set[str]:
        return {m.decode() for m in await self.redis.smembers(MODELS_KEY)}

    async def alive(self, worker_id: str) -> bool:
        return any(worker["id"] == worker_id for worker in await self.workers())

    async def web_beat(self, web_id: str) -> None:
        await self.redis.set(WEB_KEY + web_id, "1", px=self.ttl_ms)

    async def live_webs(self, web_ids: set[str]) -> set[str]:
        """Those of ``web_ids`` whose web process beat within the TTL."""
        ids = sorted(web_ids)
        values = await self.redis.mget([WEB_KEY + web_id for web_id in ids])
        return {web_id for web_id, value in zip(ids, values, strict=True) if value is not None}

    async def ensure_web_heartbeat(self, interval: float) -> str:
        """Start this event loop's web heartbeat unless it runs; return the id that jobs carry.

        The first beat is written before this returns, so no worker sees a job from a web process it
        cannot find.
        """
        state = self._state()
        if state.web_heartbeat is None or state.web_heartbeat.done():
            await self.web_beat(WEB_ID)
            if state.web_heartbeat is None or state.web_heartbeat.done():  # not started by a request beside this one
                state.web_heartbeat = outlive_request(self._beat_web(interval), None, name="tripod-web-heartbeat")
        return WEB_ID

    async def _beat_web(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.web_beat(WEB_ID)
            except RegistryUnavailable as exc:
                logger.warning("web heartbeat failed: %s", exc)

    async def claim(self, job_id: str, worker_id: str) -> bool:
        """Take a job for ``worker_id``; False if a live worker already took it."""
        key = CLAIM_KEY + job_id
        if await self.redis.set(key, worker_id, nx=True, px=CLAIM_TTL_MS):
            return True
        holder = await self.redis.get(key)
        if (
            holder is not None
            and holder.decode() != worker_id
            and await self.redis.exists(WORKER_KEY + holder.decode())
        ):
            return False
        await self.redis.set(key, worker_id, px=CLAIM_TTL_MS)
        return True


_registry: WorkerRegistry | None = None


def get_registry() -> WorkerRegistry | None:
    """The registry for this deployment, or None in embedded mode (no Redis)."""
    global _registry
    from tripod.conf import config

    cfg = config()
    if not cfg.redis_url:
        return None
    if _registry is None or _registry.url != cfg.redis_url:
        _registry = WorkerRegistry(cfg.redis_url, cfg.worker_ttl)
    return _registry
