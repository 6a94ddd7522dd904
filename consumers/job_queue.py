"""A job in its model's queue until a worker starts it: the send, the wait for the worker's first event, the re-send
of a job lost before it started, and the give-up; and the 503 of the job client when the layer (Redis) fails.

Scaled, a job taken by a worker that stopped before starting it is sent again (same id: its claim lets only one
worker run it), and a job its client gives up on is marked abandoned so that no worker starts it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from channels.exceptions import ChannelFull

from tripod import job_protocol as wire
from tripod.errors import ServiceUnavailable, channel_layer_unavailable
from tripod.registry import CLAIM_MARGIN_SECONDS, REGISTRY_ERRORS, get_registry

# The job client's log lines keep one logger name, whichever of its modules writes them.
logger = logging.getLogger("consumers.jobs")
# Scaled: how often a job is sent again because the worker that took it stopped before starting it.
MAX_RESENDS = 3


def layer_down(exc: BaseException) -> ServiceUnavailable:
    """The 503 for a channel layer (Redis) that failed under a request, logged once here."""
    logger.warning("channel layer unavailable: %r", exc, exc_info=exc)
    return channel_layer_unavailable(exc)


class QueuedJob:
    """One job on its way to a worker: sent, re-sent when lost before it started, or given up."""

    def __init__(self, layer: Any, job: wire.Job, next_event: Callable[[float], Awaitable[wire.Message | None]]):
        self.layer = layer
        self.job = job
        self._next_event = next_event
        # When it was last sent (wall time), since when it has looked lost, how often it was sent again.
        self._sent_at = 0.0
        self._unclaimed_since: float | None = None
        self._resends = 0

    async def send(self) -> None:
        """Put the job on its model's job channel; a full channel is a 503 ``queue_full``."""
        try:
            await self.layer.send(wire.job_channel(self.job.model), wire.encode(self.job))
        except ChannelFull:
            raise ServiceUnavailable(
                f"Too many requests are waiting for model '{self.job.model}'; retry later.", code="queue_full"
            ) from None
        self._sent_at = time.time()
        self._unclaimed_since = None

    async def wait(self, cfg) -> wire.Message | None:
        """The worker's first event; scaled, give up early once no worker of the model is alive, and send the job
        again when the worker that took it stopped before starting it."""
        registry = get_registry()
        deadline = time.monotonic() + cfg.queue_timeout
        orphaned_since = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            event = await self._next_event(min(left, 1.0) if registry else left)
            if event is not None:
                return event
            if registry is not None:
                if self.job.model in await registry.live_models():
                    orphaned_since = None
                elif orphaned_since is None:
                    orphaned_since = time.monotonic()
                elif time.monotonic() - orphaned_since > cfg.no_worker_wait:
                    raise ServiceUnavailable(
                        f"No live worker serves the model '{self.job.model}' any more.",
                        param="model",
                        code="no_worker_available",
                    )
                if await self._lost_before_start(registry, cfg):
                    await self._send_again()

    async def _lost_before_start(self, registry, cfg) -> bool:
        """Whether no live worker has this job: it left the queue but nobody claimed it for ``worker_ttl``, or the
        worker that claimed it stopped beating. A stopped worker may have taken it (a ``SIGSTOP`` during its
        blocking read: Redis hands the job to a process that cannot run), or lost it (that read timed out).
        """
        try:
            if not await registry.left_queue(
                getattr(self.layer, "prefix", "asgi") + wire.job_channel(self.job.model), self._sent_at
            ):
                self._unclaimed_since = None
                return False  # still waiting its turn
            holder = await registry.claim_holder(self.job.id)
            if holder is None:
                now = time.monotonic()
                if self._unclaimed_since is None:
                    self._unclaimed_since = now
                return now - self._unclaimed_since >= cfg.worker_ttl
            self._unclaimed_since = None
            return not holder.startswith("!") and not await registry.alive(holder)
        except REGISTRY_ERRORS:
            return False  # Redis itself is down: the queue timeout still bounds the wait

    async def _send_again(self) -> None:
        """Send the job again, same id: its claim lets only one worker run it, whichever copy it pulls."""
        if self._resends >= MAX_RESENDS:
            await self.give_up()
            raise ServiceUnavailable(
                f"The workers that took this request stopped before starting it, {self._resends + 1} times.",
                code="worker_lost",
            )
        self._resends += 1
        logger.warning("job %s: taken by a worker that stopped before starting it; sending it again", self.job.id)
        await self.send()

    async def give_up(self, keep: float | None = None) -> None:
        """Scaled: mark this job abandoned, so that no worker starts it and a worker that holds it stops it."""
        registry = get_registry()
        if registry is None:
            return
        keep = max(self.job.deadline - time.time(), 0.0) + CLAIM_MARGIN_SECONDS if keep is None else keep
        try:
            await registry.abandon(self.job.id, keep)
        except REGISTRY_ERRORS as exc:
            logger.warning("job %s: could not mark it abandoned: %s", self.job.id, exc)
