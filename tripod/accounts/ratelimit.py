"""Per-key limits: requests per minute, tokens per minute, generations at once.

Windows slide, so that no 60-second span ever holds more than the limit; with ``REDIS_URL`` each check-and-take is
one Lua script in Redis, atomic across all web processes, else it runs in this process under a lock. Tokens are
reserved at admission for all a request may use and settled to its exact usage when it ends, so a request is admitted
only when it fits beside what is already reserved or spent.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from tripod.accounts.keys import Principal
from tripod.errors import APIError
from tripod.protocol import GenerationRequest
from tripod.registry import get_registry

# A token reservation counts against the limit for as long as its request runs, however long that is; a settled
# request counts for this long after it ended.
WINDOW_SECONDS = 60.0
# A generation slot or token reservation held longer than this is assumed leaked (a web process died holding it).
STREAM_LEASE_SECONDS = 3600.0
# Tokens a chat template may add around the messages' own text (role markers, a generation prompt, a default
# system prompt), on top of each message's JSON (whose keys and quotes stand for its role markers).
TEMPLATE_ALLOWANCE = 32


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after = max(1, math.ceil(retry_after))
        self.headers = {"Retry-After": str(self.retry_after)}


def prompt_token_bound(request: GenerationRequest) -> int:
    """At most how many tokens the prompt is, without a tokenizer: its UTF-8 bytes (a byte-level BPE token is at
    least one byte), a chat's messages as JSON plus ``TEMPLATE_ALLOWANCE``. The worker reports the exact count."""
    if request.kind == "chat":
        text = json.dumps(request.messages or [], ensure_ascii=False, separators=(",", ":"))
        return len(text.encode()) + TEMPLATE_ALLOWANCE
    return len((request.prompt or "").encode()) + 2  # and a start and an end-of-text token


def reservation(request: GenerationRequest, max_tokens_cap: int = 0) -> tuple[int, int]:
    """What to reserve at admission, and the least the request can use (to refuse one that can never fit).

    Without ``max_tokens``, the completion may run to the server's cap, else to the end of the context window,
    which only the worker knows: the reservation is then capped by the key's limit, and set exactly once the
    worker reports its budget. Each of ``n`` choices may use the whole budget; the prompt counts once.
    """
    prompt = prompt_token_bound(request)
    n = request.params.n
    max_tokens = request.params.max_tokens or max_tokens_cap or None
    if max_tokens is None:
        return math.inf, n
    return prompt + n * max_tokens, n * (1 + (request.params.max_tokens or 0))


@dataclass
class Lease:
    """What an admitted request holds until it ends: a request in the window, a generation slot, reserved tokens."""

    limiter: RateLimiter
    principal: Principal
    reserved: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    released: bool = False

    async def resize(self, tokens: int) -> None:
        """Set the reservation to ``tokens`` (the exact budget, once the worker knows it).

        Shrinking always succeeds; growing raises ``RateLimited`` when the difference does not fit.
        """
        if self.released or tokens == self.reserved or self.principal.tpm is None:
            return
        if tokens > self.principal.tpm:
            raise _too_large(self.principal, tokens)
        await self.limiter.resize(self, tokens)
        self.reserved = tokens

    async def release(self, tokens: int) -> None:
        """Settle: give back the reservation and count the ``tokens`` the request used."""
        if not self.released:
            self.released = True
            await self.limiter.release(self, tokens)


def _refusal(principal: Principal, what: str, limit: int, retry_after: float) -> RateLimited:
    return RateLimited(f"Rate limit reached for key '{principal.name}': {limit} {what}. Retry later.", retry_after)


def _tokens_refusal(principal: Principal, wanted: int, used: int, retry_after: float) -> RateLimited:
    return RateLimited(
        f"Rate limit reached for key '{principal.name}': {principal.tpm} tokens per minute. "
        f"Used or reserved: {used}, requested: {wanted} (prompt + max_tokens). Retry later, or ask for fewer tokens.",
        retry_after,
    )


def _too_large(principal: Principal, wanted: int) -> RateLimited:
    return RateLimited(
        f"Request too large for key '{principal.name}': {principal.tpm} tokens per minute, but this request may use "
        f"{wanted} (prompt + max_tokens), so it can never fit. Lower 'max_tokens' or shorten the prompt.",
        WINDOW_SECONDS,
    )


class RateLimiter:
    """The interface: ``admit()`` before a request runs, ``Lease.resize()`` once its budget is exact,
    ``Lease.release(tokens)`` when it ends."""

    async def admit(self, principal: Principal, reserve: int) -> Lease:
        raise NotImplementedError

    async def resize(self, lease: Lease, tokens: int) -> None:
        raise NotImplementedError

    async def release(self, lease: Lease, tokens: int) -> None:
        raise NotImplementedError


class MemoryRateLimiter(RateLimiter):
    """Counters in this process (embedded mode: one web process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._reserved: dict[str, dict[str, tuple[float, int]]] = {}
        self._streams: dict[str, int] = {}

    def _tokens_in_use(self, bucket: str, now: float) -> tuple[int, float]:
        """Spent in the window plus reserved now, and when the oldest spent tokens leave the window."""
        tokens = self._tokens.setdefault(bucket, deque())
        while tokens and tokens[0][0] <= now - WINDOW_SECONDS:
            tokens.popleft()
        reserved = self._reserved.setdefault(bucket, {})
        for lease_id, (since, _) in list(reserved.items()):
            if since <= now - STREAM_LEASE_SECONDS:
                del reserved[lease_id]
        used = sum(n for _, n in tokens) + sum(n for _, n in reserved.values())
        return used, tokens[0][0] + WINDOW_SECONDS - now if tokens else 1

    async def admit(self, principal: Principal, reserve: int) -> Lease:
        bucket = principal.bucket
        now = time.monotonic()
        lease = Lease(self, principal, reserved=reserve if principal.tpm is not None else 0)
        with self._lock:
            requests = self._requests.setdefault(bucket, deque())
            while requests and requests[0] <= now - WINDOW_SECONDS:
                requests.popleft()
            if principal.rpm is not None and len(requests) >= principal.rpm:
                raise _refusal(principal, "requests per minute", principal.rpm, requests[0] + WINDOW_SECONDS - now)
            if principal.tpm is not None:
                used, wait = self._tokens_in_use(bucket, now)
                if used + reserve > principal.tpm:
                    raise _tokens_refusal(principal, reserve, used, wait)
            if principal.max_streams is not None and self._streams.get(bucket, 0) >= principal.max_streams:
                raise _refusal(principal, "generations at once", principal.max_streams, 1)
            requests.append(now)
            self._streams[bucket] = self._streams.get(bucket, 0) + 1
            if lease.reserved:
                self._reserved[bucket][lease.id] = (now, lease.reserved)
        return lease

    async def resize(self, lease: Lease, tokens: int) -> None:
        principal = lease.principal
        bucket = principal.bucket
        now = time.monotonic()
        with self._lock:
            used, wait = self._tokens_in_use(bucket, now)
            since, held = self._reserved[bucket].get(lease.id, (now, 0))
            if tokens > held and used - held + tokens > principal.tpm:
                raise _tokens_refusal(principal, tokens, used - held, wait)
            self._reserved[bucket][lease.id] = (since, tokens)

    async def release(self, lease: Lease, tokens: int) -> None:
        bucket = lease.principal.bucket
        with self._lock:
            self._streams[bucket] = max(0, self._streams.get(bucket, 0) - 1)
            self._reserved.get(bucket, {}).pop(lease.id, None)
            if tokens:
                self._tokens.setdefault(bucket, deque()).append((time.monotonic(), tokens))


# Token accounting shared by the scripts. KEYS[2]: spent tokens, a zset of "lease:n" by end time; KEYS[4]: reserved
# tokens, a hash of lease -> n; KEYS[5]: when each reservation was made, a zset (to drop those of a dead process).
_TOKENS_IN_USE = """
local function tokens_in_use(now, window, ttl)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  local stale = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - ttl)
  for _, id in ipairs(stale) do redis.call('HDEL', KEYS[4], id) end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - ttl)
  local used = 0
  for _, entry in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    used = used + tonumber(string.match(entry, ':(%d+)$'))
  end
  for _, n in ipairs(redis.call('HVALS', KEYS[4])) do used = used + tonumber(n) end
  local wait = 1
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if oldest[2] then wait = tonumber(oldest[2]) + window - now end
  return used, wait
end
"""

# KEYS: requests, spent tokens, streams, reserved, reserved-at. ARGV: now, window, rpm, tpm, max_streams, lease id,
# lease ttl, tokens to reserve. Returns {0, 0, 0} when admitted, else {1|2|3 (which limit), seconds until it frees,
# tokens used or reserved}.
_ADMIT = (
    _TOKENS_IN_USE
    + """
local now, window, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[7])
local rpm, tpm, streams, reserve = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - ttl)
if rpm >= 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {1, tostring(tonumber(oldest[2]) + window - now), 0}
end
if tpm >= 0 then
  local used, wait = tokens_in_use(now, window, ttl)
  if used + reserve > tpm then return {2, tostring(wait), used} end
end
if streams >= 0 and redis.call('ZCARD', KEYS[3]) >= streams then
  return {3, '1', 0}
end
redis.call('ZADD', KEYS[1], now, ARGV[6])
redis.call('ZADD', KEYS[3], now, ARGV[6])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
redis.call('PEXPIRE', KEYS[3], math.ceil(ttl * 1000))
if tpm >= 0 and reserve > 0 then
  redis.call('HSET', KEYS[4], ARGV[6], reserve)
  redis.call('ZADD', KEYS[5], now, ARGV[6])
  redis.call('PEXPIRE', KEYS[4], math.ceil(ttl * 1000))
  redis.call('PEXPIRE', KEYS[5], math.ceil(ttl * 1000))
end
return {0, '0', 0}
"""
)

# KEYS: as _ADMIT. ARGV: now, window, lease ttl, tpm, lease id, tokens. Returns {0, 0, 0} when resized, else {2,
# seconds until tokens free, tokens used or reserved by the others}.
_RESIZE = (
    _TOKENS_IN_USE
    + """
local now, window, ttl, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[6])
local used, wait = tokens_in_use(now, window, ttl)
local held = tonumber(redis.call('HGET', KEYS[4], ARGV[5]) or '0')
if tokens > held and used - held + tokens > tpm then return {2, tostring(wait), used - held} end
redis.call('HSET', KEYS[4], ARGV[5], tokens)
if redis.call('ZSCORE', KEYS[5], ARGV[5]) == false then redis.call('ZADD', KEYS[5], now, ARGV[5]) end
redis.call('PEXPIRE', KEYS[4], math.ceil(ttl * 1000))
redis.call('PEXPIRE', KEYS[5], math.ceil(ttl * 1000))
return {0, '0', 0}
"""
)


class RedisRateLimiter(RateLimiter):
    """Counters in Redis, shared by every web process; each admission, resize and settlement is atomic."""

    def __init__(self, registry) -> None:
        self.registry = registry

    @staticmethod
    def _keys(bucket: str) -> list[str]:
        # One hash tag per bucket: a script touches only keys of one slot (Redis Cluster).
        kinds = ("requests", "tokens", "streams", "reserved", "reserved_at")
        return [f"tripod:rl:{{{bucket}}}:{kind}" for kind in kinds]

    async def admit(self, principal: Principal, reserve: int) -> Lease:
        lease = Lease(self, principal, reserved=reserve if principal.tpm is not None else 0)
        args = [
            time.time(),
            WINDOW_SECONDS,
            -1 if principal.rpm is None else principal.rpm,
            -1 if principal.tpm is None else principal.tpm,
            -1 if principal.max_streams is None else principal.max_streams,
            lease.id,
            STREAM_LEASE_SECONDS,
            lease.reserved,
        ]
        which, wait, used = await self.registry.redis.eval(_ADMIT, 5, *self._keys(principal.bucket), *args)
        which, wait = int(which), float(wait)
        if which == 1:
            raise _refusal(principal, "requests per minute", principal.rpm, wait)
        if which == 2:
            raise _tokens_refusal(principal, reserve, int(used), wait)
        if which == 3:
            raise _refusal(principal, "generations at once", principal.max_streams, wait)
        return lease

    async def resize(self, lease: Lease, tokens: int) -> None:
        principal = lease.principal
        args = [time.time(), WINDOW_SECONDS, STREAM_LEASE_SECONDS, principal.tpm, lease.id, tokens]
        which, wait, used = await self.registry.redis.eval(_RESIZE, 5, *self._keys(principal.bucket), *args)
        if int(which):
            raise _tokens_refusal(principal, tokens, int(used), float(wait))

    async def release(self, lease: Lease, tokens: int) -> None:
        _, token_key, stream_key, reserved_key, reserved_at_key = self._keys(lease.principal.bucket)
        async with self.registry.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(stream_key, lease.id)
            pipe.hdel(reserved_key, lease.id)
            pipe.zrem(reserved_at_key, lease.id)
            if tokens:
                pipe.zadd(token_key, {f"{lease.id}:{tokens}": time.time()})
                pipe.pexpire(token_key, int(WINDOW_SECONDS * 1000))
            await pipe.execute()


_memory = MemoryRateLimiter()


def get_rate_limiter() -> RateLimiter:
    registry = get_registry()
    return RedisRateLimiter(registry) if registry is not None else _memory


async def admit(principal: Principal, request: GenerationRequest, max_tokens_cap: int = 0) -> Lease | None:
    """Take a request's share of its key's limits, reserving every token it may use; ``None`` for callers without
    limits. A request that may use more than the whole tokens-per-minute limit is refused at once."""
    if not principal.limited:
        return None
    reserve, least = reservation(request, max_tokens_cap)
    if principal.tpm is not None:
        if least > principal.tpm:
            raise _too_large(principal, least)
        reserve = min(reserve, principal.tpm)
    return await get_rate_limiter().admit(principal, int(reserve) if principal.tpm is not None else 0)


__all__ = ["Lease", "RateLimited", "admit", "prompt_token_bound", "reservation"]
