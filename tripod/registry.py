"""The worker registry in Redis: who is alive, which models they serve, who owns which job.

Workers and web processes each beat a key with a short TTL, so a missing key is a dead process: the web tier reads
the workers' beats to list models, to decide readiness and to notice a worker that died mid-stream, and a worker
stops the generations of a web process that died. A claim per job makes a job sent or delivered twice run once.
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

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tripod import job_protocol as wire
from tripod.patches.redis_connections import connection_options
from tripod.patches.request_threads import outlive_request

logger = logging.getLogger(__name__)

# Each worker beats WORKER_KEY + its id (a JSON record) with a short TTL.
WORKER_KEY = "tripod:worker:"
# Web processes beat WEB_KEY + their id from their first generation on, and name themselves in each job, so that a
# worker stops the generations of a web process that died (a crash, SIGKILL, a lost host), which nobody can read any
# more, instead of running them to their last token.
WEB_KEY = "tripod:web:"
# This web process, as the jobs it submits name it.
WEB_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
MODELS_KEY = "tripod:models"
# A job's claim (CLAIM_KEY + job id) says who owns it, so that a job sent twice (the web tier sends again a job that
# a stopped worker took) or delivered twice is served once. It holds the id of the worker running the job, renewed
# with each of that worker's heartbeats; then ENDED until the job's queue deadline, past which no copy of it may
# start; or ABANDONED when its client gave up on it, which a worker holding it reads as "stop".
CLAIM_KEY = "tripod:claim:"
# Claim values that no worker id can be: the job is over, or given up by its client. Neither is ever taken over.
ENDED = "!ended"
ABANDONED = "!abandoned"
# A running job's claim lives this many worker TTLs past its worker's last heartbeat (each beat renews it).
CLAIM_TTL_BEATS = 10
# An ended or abandoned job's claim outlives its queue deadline by this much (clocks of two hosts differ a little).
CLAIM_MARGIN_SECONDS = 5.0
# The ids of jobs that a client gave up while a stopped worker ran them stay at least this long, so that the worker
# learns it when it resumes.
ABANDONED_SECONDS = 600.0

# Take a job unless someone else holds it: a live worker, or a final ``!`` value. A dead worker's claim is taken over.
# KEYS: the claim; ARGV: worker id, TTL in ms, the worker key prefix.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
    if string.sub(holder, 1, 1) == '!' or redis.call('EXISTS', ARGV[3] .. holder) == 1 then
        return 0
    end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# Renew a worker's claims; answer the (1-based) positions of those it no longer holds. A missing claim is taken
# again: Redis restarted, or the claim expired while nobody else wanted the job.
# KEYS: the claims; ARGV: worker id, TTL in ms.
_RENEW = """
local lost = {}
for i, key in ipairs(KEYS) do
    local holder = redis.call('GET', key)
    if not holder or holder == ARGV[1] then
        redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    else
        table.insert(lost, i)
    end
end
return lost
"""
# End a job's claim if this worker still holds it: ``!ended`` for ARGV[2] ms, or no key when that is 0.
# KEYS: the claim; ARGV: worker id, ms to keep.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    if tonumber(ARGV[2]) > 0 then
        redis.call('SET', KEYS[1], '!ended', 'PX', ARGV[2])
    else
        redis.call('DEL', KEYS[1])
    end
end
return 0
"""

# The exceptions a failing Redis raises (a tuple for `except`), for callers that turn them into a 503 or a retry.
REGISTRY_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
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
        self.workers: list[wire.WorkerBeat] = []
        self.fetched_at = float("-inf")
        self.lock = asyncio.Lock()
        self.web_heartbeat: asyncio.Task | None = None
        self.claim_script = self.client.register_script(_CLAIM)
        self.renew_script = self.client.register_script(_RENEW)
        self.release_script = self.client.register_script(_RELEASE)
        # Per queue key: (wall time of the read, score of its oldest message or None).
        self.queue_heads: dict[str, tuple[float, float | None]] = {}


class WorkerRegistry:
    """Heartbeats and claims; one Redis client per event loop (redis.asyncio clients are loop-bound)."""

    def __init__(self, url: str, ttl: float) -> None:
        self.url = url
        self.ttl_ms = max(int(ttl * 1000), 100)
        self.claim_ttl_ms = CLAIM_TTL_BEATS * self.ttl_ms
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

    async def beat(self, beat: wire.WorkerBeat) -> None:
        """Write the worker's heartbeat record (with the wall time of the beat, for a reader of Redis)."""
        record = json.dumps({**wire.encode(beat), "last_beat": time.time()})
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(WORKER_KEY + beat.id, record, px=self.ttl_ms)
            pipe.sadd(MODELS_KEY, beat.model)
            await pipe.execute()

    async def remove(self, worker_id: str) -> None:
        await self.redis.delete(WORKER_KEY + worker_id)

    async def workers(self) -> list[wire.WorkerBeat]:
        """Live workers' heartbeats, at most ``WORKERS_CACHE_SECONDS`` old; one fetch at a time per loop."""
        state = self._state()
        if time.monotonic() - state.fetched_at < WORKERS_CACHE_SECONDS:
            return state.workers
        async with state.lock:
            if time.monotonic() - state.fetched_at >= WORKERS_CACHE_SECONDS:
                state.workers = await self._fetch_workers(state.client)
                state.fetched_at = time.monotonic()
        return state.workers

    @staticmethod
    async def _fetch_workers(client: aioredis.Redis) -> list[wire.WorkerBeat]:
        keys = [key async for key in client.scan_iter(match=WORKER_KEY + "*", count=1000)]
        if not keys:
            return []
        beats = []
        for key, value in zip(keys, await client.mget(keys), strict=True):
            if value is None:
                continue  # expired between the scan and the read
            try:
                beats.append(wire.decode(json.loads(value), wire.WorkerBeat))
            except wire.ProtocolError as exc:
                logger.warning("ignoring the heartbeat %s: %s", key.decode(), exc)
        return beats

    async def live_models(self) -> set[str]:
        return {worker.model for worker in await self.workers()}

    async def known_models(self) -> set[str]:
        return {m.decode() for m in await self.redis.smembers(MODELS_KEY)}

    async def alive(self, worker_id: str) -> bool:
        return any(worker.id == worker_id for worker in await self.workers())

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
            except REGISTRY_ERRORS as exc:
                logger.warning("web heartbeat failed: %s", exc)

    async def claim(self, job_id: str, worker_id: str) -> bool:
        """Take a job for ``worker_id``; False if a live worker holds it, or it ended, or its client gave it up."""
        state = self._state()
        taken = await state.claim_script(keys=[CLAIM_KEY + job_id], args=[worker_id, self.claim_ttl_ms, WORKER_KEY])
        return bool(taken)

    async def renew_claims(self, job_ids: list[str], worker_id: str) -> list[str]:
        """Renew ``worker_id``'s claims (each heartbeat); return the jobs it no longer holds, to stop them."""
        if not job_ids:
            return []
        state = self._state()
        lost = await state.renew_script(
            keys=[CLAIM_KEY + job_id for job_id in job_ids], args=[worker_id, self.claim_ttl_ms]
        )
        return [job_ids[int(i) - 1] for i in lost]

    async def holds(self, job_id: str, worker_id: str) -> bool:
        """Whether ``worker_id`` still holds the job's claim."""
        holder = await self.redis.get(CLAIM_KEY + job_id)
        return holder is not None and holder.decode() == worker_id

    async def release(self, job_id: str, worker_id: str, deadline: float | None) -> None:
        """End ``worker_id``'s claim: kept as ``!ended`` while a copy of the job could still start (its deadline)."""
        keep = 0.0 if deadline is None else deadline + CLAIM_MARGIN_SECONDS - time.time()
        await self._state().release_script(keys=[CLAIM_KEY + job_id], args=[worker_id, max(int(keep * 1000), 0)])

    async def abandon(self, job_id: str, keep: float) -> None:
        """Mark a job given up by its client for ``keep`` seconds: no worker starts it, its holder stops it."""
        await self.redis.set(CLAIM_KEY + job_id, ABANDONED, px=max(int(keep * 1000), 1))

    async def claim_holder(self, job_id: str) -> str | None:
        """Who holds the job: a worker id, ``!ended``, ``!abandoned``, or None (nobody claimed it yet)."""
        holder = await self.redis.get(CLAIM_KEY + job_id)
        return None if holder is None else holder.decode()

    async def left_queue(self, queue_key: str, sent_at: float) -> bool:
        """Whether a message sent to ``queue_key`` by ``sent_at`` (wall time) has been taken from it.

        channels_redis keeps a channel as a sorted set scored by send time (and a ``$inflight`` set of messages
        whose receive was cancelled, which go back): once the oldest score is later than ``sent_at``, or both are
        empty, the message left. One read per queue serves a process's waiting jobs for ``WORKERS_CACHE_SECONDS``.
        """
        state = self._state()
        read_at, head = state.queue_heads.get(queue_key, (float("-inf"), None))
        if read_at < sent_at or time.time() - read_at >= WORKERS_CACHE_SECONDS:
            read_at = time.time()
            async with state.client.pipeline(transaction=False) as pipe:
                pipe.zrange(queue_key, 0, 0, withscores=True)
                pipe.zrange(queue_key + "$inflight", 0, 0, withscores=True)
                queued, inflight = await pipe.execute()
            scores = [score for _, score in (*queued, *inflight)]
            head = min(scores) if scores else None
            state.queue_heads[queue_key] = (read_at, head)
        return head is None or head > sent_at


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
