"""Per-key limits: requests per minute, tokens per minute, generations at once.

Sliding windows, so that no 60-second span ever holds more than the limit. With ``REDIS_URL`` the
counters live in Redis and every check-and-take is one Lua script (atomic across all web processes);
otherwise they live in this process. Tokens are settled when a request ends, from its exact usage.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from tripod.auth import Principal
from tripod.errors import APIError
from tripod.registry import get_registry

WINDOW_SECONDS = 60.0
# A generation slot held longer than this is assumed leaked (a web process died holding it).
STREAM_LEASE_SECONDS = 3600.0


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after = max(1, math.ceil(retry_after))
        self.headers = {"Retry-After": str(self.retry_after)}


@dataclass
class Lease:
    """What an admitted request holds until it ends: a generation slot, and tokens to settle."""

    limiter: RateLimiter
    principal: Principal
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    released: bool = False

    async def release(self, tokens: int) -> None:
        if not self.released:
            self.released = True
            await self.limiter.release(self, tokens)


def _refusal(principal: Principal, what: str, limit: int, retry_after: float) -> RateLimited:
    return RateLimited(f"Rate limit reached for key '{principal.name}': {limit} {what}. Retry later.", retry_after)


class RateLimiter:
    """The interface: ``admit()`` before a request runs, ``Lease.release(tokens)`` when it ends."""

    async def admit(self, principal: Principal) -> Lease:
        raise NotImplementedError

    async def release(self, lease: Lease, tokens: int) -> None:
        raise NotImplementedError


class MemoryRateLimiter(RateLimiter):
    """Counters in this process (embedded mode: one web process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._streams: dict[str, int] = {}

    async def admit(self, principal: Principal) -> Lease:
        bucket = principal.bucket
        now = time.monotonic()
        with self._lock:
            requests = self._requests.setdefault(bucket, deque())
            while requests and requests[0] <= now - WINDOW_SECONDS:
                requests.popleft()
            tokens = self._tokens.setdefault(bucket, deque())
            while tokens and tokens[0][0] <= now - WINDOW_SECONDS:
                tokens.popleft()
            if principal.rpm is not None and len(requests) >= principal.rpm:
                raise _refusal(principal, "requests per minute", principal.rpm, requests[0] + WINDOW_SECONDS - now)
            if principal.tpm is not None and sum(n for _, n in tokens) >= principal.tpm:
                raise _refusal(principal, "tokens per minute", principal.tpm, tokens[0][0] + WINDOW_SECONDS - now)
            if principal.max_streams is not None and self._streams.get(bucket, 0) >= principal.max_streams:
                raise _refusal(principal, "generations at once", principal.max_streams, 1)
            requests.append(now)
            self._streams[bucket] = self._streams.get(bucket, 0) + 1
        return Lease(self, principal)

    async def release(self, lease: Lease, tokens: int) -> None:
        bucket = lease.principal.bucket
        with self._lock:
            self._streams[bucket] = max(0, self._streams.get(bucket, 0) - 1)
            if tokens:
                self._tokens.setdefault(bucket, deque()).append((time.monotonic(), tokens))


# KEYS: requests zset, tokens zset, streams zset. ARGV: now, window, rpm, tpm, max_streams, lease id, lease ttl.
# Returns {0, 0} when admitted, else {1|2|3 (which limit), seconds until it frees}.
_ADMIT = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm, tpm, streams = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[7]))
if rpm >= 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {1, tostring(tonumber(oldest[2]) + window - now)}
end
if tpm >= 0 then
  local used = 0
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1)
  for _, entry in ipairs(entries) do
    used = used + tonumber(string.match(entry, ':(%d+)$'))
  end
  if used >= tpm then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {2, tostring(tonumber(oldest[2]) + window - now)}
  end
end
if streams >= 0 and redis.call('ZCARD', KEYS[3]) >= streams then
  return {3, '1'}
end
redis.call('ZADD', KEYS[1], now, ARGV[6])
redis.call('ZADD', KEYS[3], now, ARGV[6])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
redis.call('PEXPIRE', KEYS[3], math.ceil(tonumber(ARGV[7]) * 1000))
return {0, '0'}
"""


class RedisRateLimiter(RateLimiter):
    """Counters in Redis, shared by every web process; each admission is one atomic script."""

    def __init__(self, registry) -> None:
        self.registry = registry

    @staticmethod
    def _keys(bucket: str) -> list[str]:
        return [f"tripod:rl:{bucket}:{kind}" for kind in ("requests", "tokens", "streams")]

    async def admit(self, principal: Principal) -> Lease:
        lease = Lease(self, principal)
        args = [
            time.time(),
            WINDOW_SECONDS,
            -1 if principal.rpm is None else principal.rpm,
            -1 if principal.tpm is None else principal.tpm,
            -1 if principal.max_streams is None else principal.max_streams,
            lease.id,
            STREAM_LEASE_SECONDS,
        ]
        which, wait = await self.registry.redis.eval(_ADMIT, 3, *self._keys(principal.bucket), *args)
        which, wait = int(which), float(wait)
        if which == 1:
            raise _refusal(principal, "requests per minute", principal.rpm, wait)
        if which == 2:
            raise _refusal(principal, "tokens per minute", principal.tpm, wait)
        if which == 3:
            raise _refusal(principal, "generations at once", principal.max_streams, wait)
        return lease

    async def release(self, lease: Lease, tokens: int) -> None:
        _, token_key, stream_key = self._keys(lease.principal.bucket)
        async with self.registry.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(stream_key, lease.id)
            if tokens:
                pipe.zadd(token_key, {f"{lease.id}:{tokens}": time.time()})
                pipe.pexpire(token_key, int(WINDOW_SECONDS * 1000))
            await pipe.execute()


_memory = MemoryRateLimiter()


def get_rate_limiter() -> RateLimiter:
    registry = get_registry()
    return RedisRateLimiter(registry) if registry is not None else _memory


async def admit(principal: Principal) -> Lease | None:
    """Take a request's share of its key's limits; ``None`` for callers without limits."""
    if not principal.limited:
        return None
    return await get_rate_limiter().admit(principal)


__all__ = ["Lease", "RateLimited", "admit"]
