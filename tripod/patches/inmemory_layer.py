"""The embedded mode's channel layer: channels' ``InMemoryChannelLayer`` without its per-message overheads.

The stock layer sweeps every channel for expired messages on each ``receive`` and rebuilds a queue per message, and
each streamed token is one message, on the event loop the batching thread needs. Here the sweep runs on a timer and a
live channel keeps its queue (docs/architecture.md, "Why each patch").
"""

from __future__ import annotations

import asyncio
import time
from copy import deepcopy

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer

# The requirements this patch was written against; tests/test_patch_pins.py holds requirements.txt to them.
WRITTEN_AGAINST = {"channels": "==4.3.2"}

# A message holding only these is copied with dict(): a delta's copy costs a fifth of a deepcopy.
_IMMUTABLE = frozenset((str, int, float, bool, bytes, type(None)))


def _copy(message: dict) -> dict:
    """What the receiver gets: a copy that nothing the sender does afterwards can change."""
    if all(type(value) in _IMMUTABLE for value in message.values()):
        return dict(message)
    return deepcopy(message)


class LocalChannelLayer(InMemoryChannelLayer):
    """``InMemoryChannelLayer`` with the expiry sweep on a timer and one queue per live channel."""

    sweep_interval = 1.0  # seconds; messages expire after a minute or more
    # A cancelled receive leaves its message in the queue (asyncio.Queue.get), so a reader may await it under a
    # timeout instead of keeping a receive task pending.
    receive_is_cancel_safe = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._next_sweep = 0.0

    def _queue(self, channel: str) -> asyncio.Queue:
        """The channel's queue; a name is checked when its queue is made, not on every message."""
        queue = self.channels.get(channel)
        if queue is None:
            self.require_valid_channel_name(channel)
            queue = self.channels[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        return queue

    async def send(self, channel: str, message: dict) -> None:
        assert isinstance(message, dict), "message is not a dict"
        assert "__asgi_channel__" not in message
        try:
            self._queue(channel).put_nowait((time.time() + self.expiry, _copy(message)))
        except asyncio.QueueFull:
            raise ChannelFull(channel) from None

    async def receive(self, channel: str) -> dict:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval
            self._clean_expired()
        _, message = await self._queue(channel).get()
        return message

    def _clean_expired(self) -> None:
        super()._clean_expired()
        for channel, queue in list(self.channels.items()):
            if queue.empty() and not queue._getters:  # the stock layer reads asyncio.Queue's internals too
                del self.channels[channel]
