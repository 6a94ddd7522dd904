"""How Tripod connects to Redis: fail fast while Redis is down, and survive its restart unnoticed.

A pooled connection outlives a Redis restart as a dead socket, so every command is retried once on a fresh connection
after a connection error; and all of a process's local channels share one Redis key, so that one reader serves them
all. Why each holds: docs/architecture.md, "Why each patch".
"""

from __future__ import annotations

import uuid
from typing import Any

from channels_redis.core import RedisChannelLayer
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from tripod.job_protocol import JOB_CHANNEL_PREFIX

# The requirements this patch was written against; tests/test_patch_pins.py holds requirements.txt to them.
WRITTEN_AGAINST = {"channels-redis": "==4.3.0"}


def connection_options(read_timeout: float, connect_timeout: float = 1.0) -> dict[str, Any]:
    """Keyword arguments for a redis-py asyncio connection pool or client."""
    return {
        "socket_timeout": read_timeout,
        "socket_connect_timeout": connect_timeout,
        # One immediate retry on a fresh connection, for connection errors only: never for a read timeout, so a
        # blocking read is not waited for twice.
        "retry": Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
    }


# Every process-local channel of a process (reply channels, a worker's control channel, any consumer's own
# channel) is named LOCAL_CHANNELS + the process's client prefix + "!" + what it is for.
LOCAL_CHANNELS = "tripod.local."
# Connections one process's channel layer may hold at once, and how long a send waits for one beyond that.
LAYER_POOL_CONNECTIONS = 1024
LAYER_POOL_WAIT_SECONDS = 10


class OneKeyRedisChannelLayer(RedisChannelLayer):
    """channels_redis with all of a process's local channels in one Redis key, so one reader serves them all.

    channels_redis stores a local channel (``name!suffix``) under the key of its part before ``!`` and reads every
    local channel of a process under one lock, whose holder pops that one key until a message arrives there. With
    the stock names, ``new_channel("specific")`` (what every Channels consumer gets) and
    ``new_channel("tripod.reply.")`` are two keys: an idle consumer's receive held the lock on its own empty key,
    and the reply channels of every generation in that process were never read. Here every local channel shares
    one key, so whichever receive holds the lock pops messages for all of them and hands each to its waiter.
    """

    async def new_channel(self, prefix: str = "specific") -> str:
        return f"{LOCAL_CHANNELS}{self.client_prefix}!{prefix.strip('.')}.{uuid.uuid4().hex}"

    def create_pool(self, index: int) -> aioredis.ConnectionPool:
        """A blocking pool: a burst of sends waits for a connection instead of failing.

        channels_redis takes a pooled connection per send and per blocking receive, and redis-py 8 caps a plain
        pool at 100 connections and raises "Too many connections" past it: 200 concurrent streams on one web
        process failed with 503 ``channel_layer_unavailable`` on a loaded machine.
        """
        host = dict(self.hosts[index])
        return aioredis.BlockingConnectionPool.from_url(
            host.pop("address"), max_connections=LAYER_POOL_CONNECTIONS, timeout=LAYER_POOL_WAIT_SECONDS, **host
        )


def redis_channel_layer(url: str, queue_timeout: float) -> dict[str, Any]:
    """The ``CHANNEL_LAYERS`` entry of a scaled deployment: channels_redis on ``url``."""
    return {
        "BACKEND": "tripod.patches.redis_connections.OneKeyRedisChannelLayer",
        "CONFIG": {
            # redis-py 8 reads with a 5 s socket timeout by default, which aborts channels_redis's 5 s
            # blocking BZPOPMIN (django/channels_redis#422): read timeout above it, connects fail fast.
            "hosts": [{"address": url, **connection_options(read_timeout=10, connect_timeout=2)}],
            # A job may wait in its model's channel as long as the queue timeout allows.
            "expiry": int(queue_timeout) + 60,
            "capacity": 1000,
            # Every local channel of one process (all its reply channels) shares one Redis key and this
            # capacity; deltas are coalesced, so this holds hundreds of concurrent streams with room to spare.
            "channel_capacity": {LOCAL_CHANNELS + "*": 50000, JOB_CHANNEL_PREFIX + "*": 10000},
        },
    }
