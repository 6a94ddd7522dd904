"""Resumable streams: where a generation's SSE frames are kept so that a reader can leave and come back.

``POST /v1/streams`` starts a generation whose frames are appended here as the worker produces them, and ``GET`` on
the stream's signed URL replays them from any position, then follows the live ones (:mod:`consumers.resumable`).
Either store keeps a stream for ``TRIPOD_STREAM_TTL`` seconds after its last frame: Redis Streams when ``REDIS_URL``
is set, so that any web process can serve any reader, else a dict in this process.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import weakref
from dataclasses import dataclass

import redis.asyncio as aioredis
from django.core import signing

from tripod.conf import config
from tripod.errors import APIError
from tripod.patches.redis_connections import connection_options

DONE = "[DONE]"
STREAM_KEY = "tripod:stream:"
_SALT = "tripod.streams"


@dataclass(frozen=True)
class Frame:
    """One SSE event's ``data:`` text (a chunk's JSON, an error's JSON or ``[DONE]``), numbered 1, 2, 3, …"""

    id: int
    data: str

    @property
    def last(self) -> bool:
        return self.data == DONE


@dataclass(frozen=True)
class StreamInfo:
    """What a stream's creator left for its readers and for whoever cancels it."""

    id: str
    job_id: str
    control_channel: str
    model: str
    last_id: int | None  # the id of the ``[DONE]`` frame once the generation has ended

    def to_record(self) -> dict[str, str]:
        return {"job_id": self.job_id, "control_channel": self.control_channel, "model": self.model}

    @classmethod
    def from_record(cls, stream_id: str, record: dict[str, str]) -> StreamInfo:
        last = record.get("last_id")
        return cls(stream_id, record["job_id"], record["control_channel"], record["model"], int(last) if last else None)


def new_stream_id() -> str:
    return "strm_" + secrets.token_urlsafe(18)


# --- signed URLs ---------------------------------------------------------------------------------------
# A token, signed with SECRET_KEY, names one stream and an expiry. It is the only credential a reader needs,
# because EventSource cannot send headers.


class StreamTokenInvalid(APIError):
    def __init__(self, message: str, code: str = "invalid_stream_token") -> None:
        super().__init__(message, code=code, status=403, type="authentication_error")


def sign(stream_id: str, expires_at: int) -> str:
    return signing.dumps({"s": stream_id, "e": expires_at}, salt=_SALT, compress=False)


def _expiry(value: object) -> float:
    """The token's expiry as Unix time; only ``sign`` makes tokens, but one signed with the same secret
    elsewhere may carry anything there, and that is a bad token, not a server error."""
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) < 1e12:
        expires_at = float(value)
        if math.isfinite(expires_at):
            return expires_at
    raise StreamTokenInvalid("The stream token is not valid: its expiry is not a time.")


def verify(stream_id: str, token: str | None) -> None:
    """Accept ``token`` for ``stream_id`` or raise ``StreamTokenInvalid`` (bad, foreign or expired)."""
    if not token:
        raise StreamTokenInvalid("This stream URL needs its 'token' query parameter.")
    try:
        claims = signing.loads(token, salt=_SALT)
    except signing.BadSignature:
        raise StreamTokenInvalid("The stream token is not valid.") from None
    if not isinstance(claims, dict) or claims.get("s") != stream_id:
        raise StreamTokenInvalid("The stream token is for another stream.")
    expires_at = _expiry(claims.get("e"))
    if time.time() > expires_at:
        raise StreamTokenInvalid(
            "The stream URL has expired; start a new stream with POST /v1/streams.", code="stream_expired"
        )


# --- stores ---------------------------------------------------------------------------------------------


class StreamStore:
    """Frames of live and recently finished streams."""

    async def create(self, info: StreamInfo) -> None:
        raise NotImplementedError

    async def info(self, stream_id: str) -> StreamInfo | None:
        """The stream, or None once it has expired (or never existed)."""
        raise NotImplementedError

    async def append(self, stream_id: str, frame: Frame) -> None:
        raise NotImplementedError

    async def read(self, stream_id: str, after: int, wait: float) -> list[Frame]:
        """Frames with ids above ``after``; if there are none yet, wait up to ``wait`` seconds for some."""
        raise NotImplementedError

    async def reader_present(self, stream_id: str) -> None:
        """Note that a reader is connected now (readers call it about once a second)."""
        raise NotImplementedError

    async def last_reader(self, stream_id: str) -> float:
        """Unix time a reader was last connected (the stream's creation counts as one)."""
        raise NotImplementedError


class _Buffer:
    def __init__(self, info: StreamInfo, ttl: float) -> None:
        self.info = info
        self.frames: list[Frame] = []
        self.changed = asyncio.Event()
        self.expires = time.monotonic() + ttl
        self.last_reader = time.time()


class MemoryStreamStore(StreamStore):
    """One process (embedded mode): frames in a dict, readers woken by an event."""

    def __init__(self) -> None:
        self._buffers: dict[str, _Buffer] = {}

    def _sweep(self) -> None:
        now = time.monotonic()
        for stream_id in [k for k, buffer in self._buffers.items() if buffer.expires < now]:
            del self._buffers[stream_id]

    def _get(self, stream_id: str) -> _Buffer | None:
        buffer = self._buffers.get(stream_id)
        if buffer is not None and buffer.expires < time.monotonic():
            del self._buffers[stream_id]
            return None
        return buffer

    async def create(self, info: StreamInfo) -> None:
        self._sweep()
        self._buffers[info.id] = _Buffer(info, config().stream_ttl)

    async def info(self, stream_id: str) -> StreamInfo | None:
        buffer = self._get(stream_id)
        return None if buffer is None else buffer.info

    async def append(self, stream_id: str, frame: Frame) -> None:
        buffer = self._get(stream_id)
        if buffer is None:
            return  # expired while generating: nobody can read it any more
        buffer.frames.append(frame)
        buffer.expires = time.monotonic() + config().stream_ttl
        if frame.last:
            info = buffer.info
            buffer.info = StreamInfo(info.id, info.job_id, info.control_channel, info.model, frame.id)
        buffer.changed.set()
        buffer.changed = asyncio.Event()

    async def read(self, stream_id: str, after: int, wait: float) -> list[Frame]:
        buffer = self._get(stream_id)
        if buffer is None:
            return []
        # Ids are 1, 2, 3, … in list order, so frame ``after + 1`` sits at index ``after``.
        if len(buffer.frames) <= after:
            try:
                await asyncio.wait_for(buffer.changed.wait(), wait)
            except TimeoutError:
                return []
        return buffer.frames[after:]

    async def reader_present(self, stream_id: str) -> None:
        buffer = self._get(stream_id)
        if buffer is not None:
            buffer.last_reader = time.time()

    async def last_reader(self, stream_id: str) -> float:
        buffer = self._get(stream_id)
        return 0.0 if buffer is None else buffer.last_reader


class RedisStreamStore(StreamStore):
    """Shared by every web process: a Redis Stream per generation (entry ids ``0-<frame id>``) and a hash
    with its record. Readers block in ``XREAD`` on connections of their own, so that a thousand waiting
    readers do not starve the pool that admission and heartbeats share."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # socket_timeout stays above the longest XREAD block (see ``read``).
            client = aioredis.Redis.from_url(self.url, **connection_options(read_timeout=10))
            self._clients[loop] = client
        return client

    @staticmethod
    def _keys(stream_id: str) -> tuple[str, str]:
        return STREAM_KEY + stream_id, STREAM_KEY + stream_id + ":info"

    async def create(self, info: StreamInfo) -> None:
        _, info_key = self._keys(info.id)
        ttl_ms = int(config().stream_ttl * 1000)
        async with self._client().pipeline(transaction=True) as pipe:
            pipe.hset(info_key, mapping={**info.to_record(), "last_reader": time.time()})
            pipe.pexpire(info_key, ttl_ms)
            await pipe.execute()

    async def reader_present(self, stream_id: str) -> None:
        _, info_key = self._keys(stream_id)
        await self._client().hset(info_key, "last_reader", time.time())

    async def last_reader(self, stream_id: str) -> float:
        _, info_key = self._keys(stream_id)
        value = await self._client().hget(info_key, "last_reader")
        return 0.0 if value is None else float(value)

    async def info(self, stream_id: str) -> StreamInfo | None:
        _, info_key = self._keys(stream_id)
        record = await self._client().hgetall(info_key)
        if not record:
            return None
        return StreamInfo.from_record(stream_id, {k.decode(): v.decode() for k, v in record.items()})

    async def append(self, stream_id: str, frame: Frame) -> None:
        frames_key, info_key = self._keys(stream_id)
        ttl_ms = int(config().stream_ttl * 1000)
        async with self._client().pipeline(transaction=True) as pipe:
            pipe.xadd(frames_key, {"d": frame.data}, id=f"0-{frame.id}")
            pipe.pexpire(frames_key, ttl_ms)
            if frame.last:
                pipe.hset(info_key, "last_id", frame.id)
            pipe.pexpire(info_key, ttl_ms)
            await pipe.execute()

    async def read(self, stream_id: str, after: int, wait: float) -> list[Frame]:
        frames_key, _ = self._keys(stream_id)
        block_ms = max(int(min(wait, 5.0) * 1000), 1)
        reply = await self._client().xread({frames_key: f"0-{after}"}, count=1024, block=block_ms)
        frames = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                frames.append(Frame(int(entry_id.split(b"-")[1]), fields[b"d"].decode()))
        return frames


_memory = MemoryStreamStore()
_redis: RedisStreamStore | None = None


def get_store() -> StreamStore:
    global _redis
    url = config().redis_url
    if not url:
        return _memory
    if _redis is None or _redis.url != url:
        _redis = RedisStreamStore(url)
    return _redis
