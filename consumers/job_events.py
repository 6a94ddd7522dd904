"""Reading a job's reply channel: one receive at a time, each event decoded by the job protocol.

The job client (``consumers/jobs.py``) asks for the next event with a timeout; a layer whose ``receive`` may be
cancelled without losing a message is awaited directly, any other keeps one receive pending across timeouts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tripod import job_protocol as wire
from tripod.errors import EngineFailure


class ReplyReader:
    """The events of one reply channel, decoded; channel-layer errors propagate as the layer raised them."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.channel: str | None = None
        self._pending: asyncio.Future | None = None
        self._cancel_safe = getattr(layer, "receive_is_cancel_safe", False)

    async def open(self) -> str:
        """Make the reply channel the worker will send to, and return its name."""
        self.channel = await self.layer.new_channel(wire.REPLY_CHANNEL_PREFIX)
        return self.channel

    async def next_event(self, timeout: float) -> wire.Message | None:
        """The next event, decoded, or ``None`` after ``timeout``; a message it cannot read is a ``protocol_error``."""
        event = await self._receive(timeout)
        if event is None:
            return None
        try:
            return wire.decode(event)
        except wire.ProtocolError as exc:
            raise EngineFailure(
                f"The worker sent a message this server cannot read: {exc}", code="protocol_error"
            ) from None

    async def _receive(self, timeout: float) -> dict[str, Any] | None:
        if self._cancel_safe:
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    return await self.layer.receive(self.channel)
            except TimeoutError:
                return None
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.layer.receive(self.channel))
        done, _ = await asyncio.wait({self._pending}, timeout=max(timeout, 0))
        if not done:
            return None
        future, self._pending = self._pending, None
        return future.result()

    def close(self) -> None:
        """Stop the receive left pending, if any: nobody reads this channel any more."""
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self._pending = None
