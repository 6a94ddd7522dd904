"""Reading a job's events: its reply channel, one receive at a time, and what each event says of the job.

The job client (``consumers/jobs.py``) yields ``read_deltas``, in which a worker that goes silent, or (scaled) stops
beating, is an error; a client that left still reads the final usage (``read_final_usage``), so that it counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tripod import job_protocol as wire
from tripod.conf import config
from tripod.engines.base import Delta
from tripod.errors import APIError, EngineFailure, ServiceUnavailable
from tripod.registry import ABANDONED_SECONDS, REGISTRY_ERRORS, WorkerRegistry, get_registry

if TYPE_CHECKING:
    from consumers.jobs import GenerationJob

# After a client leaves, how long to wait for its worker's final usage report.
DRAIN_SECONDS = 5.0


async def read_deltas(job: GenerationJob, tick: float | None) -> AsyncIterator[Delta | None]:
    """The job's deltas until it is done; ``None`` every ``tick`` seconds of silence (for keep-alives).

    Raises ``APIError`` on a worker error, when the worker sends nothing for ``event_timeout``, or (scaled) when
    its heartbeat stops.
    """
    cfg = config()
    timeout = cfg.event_timeout
    registry = get_registry()
    # Scaled, a silent worker is checked against its heartbeat this often.
    check = cfg.heartbeat_interval if registry is not None else None
    silent_since = time.monotonic()
    while not job.finished:
        wait = timeout - (time.monotonic() - silent_since)
        if wait <= 0:
            raise EngineFailure(
                f"The worker sent nothing for {timeout:g} s; giving up on this generation.",
                code="worker_timeout",
                status=504,
            )
        event = await job.next_event(min(x for x in (wait, tick, check) if x))
        if event is None:
            if registry is not None and job.worker and not await _worker_alive(registry, job.worker):
                await _lose_worker(job)
            if tick:
                yield None
            continue
        silent_since = time.monotonic()
        delta = _apply(job, event)
        if delta is not None:
            yield delta


def _apply(job: GenerationJob, event: wire.Message) -> Delta | None:
    """What one event says of the job: a delta to yield, its end (``Done``), or its error (raised)."""
    if isinstance(event, wire.Delta):
        try:
            delta = event.to_engine()
        except wire.ProtocolError as exc:
            raise EngineFailure(
                f"The worker sent a delta this server cannot read: {exc}", code="protocol_error"
            ) from None
        _observe(job, delta)
        return delta
    if isinstance(event, wire.Done):
        job.finished = True
        job.finish_reason = event.finish_reason
        n = job.request.params.n
        reasons = list(event.finish_reasons or [event.finish_reason] * n)
        job.finish_reasons = (reasons + [event.finish_reason] * n)[:n]
        job.cancelled = job.finish_reason is None
        job.usage = event.usage
    elif isinstance(event, wire.Error):
        job.finished = True
        raise event.to_error()
    return None


def _observe(job: GenerationJob, delta: Delta) -> None:
    """Time the delta (time to first token, inter-token latency) and keep its text when content is logged."""
    now = time.monotonic()
    if job.first_token_at is None:
        job.first_token_at = now
        job.metrics.first_token(now - job.created)
        if delta.tokens > 1:
            job.metrics.tokens(0.0, delta.tokens - 1)
    elif delta.tokens:
        job.metrics.tokens(now - job.last_token_at, delta.tokens)
    job.tokens_seen += delta.tokens
    job.last_token_at = now
    if job.completion_text is not None:
        job.completion_text.append(delta.text)


async def _worker_alive(registry: WorkerRegistry, worker: str) -> bool:
    try:
        return await registry.alive(worker)
    except REGISTRY_ERRORS:
        return True  # Redis itself is down: the event timeout still bounds the wait


async def _lose_worker(job: GenerationJob) -> None:
    """End the job whose worker stopped beating (a 503 ``worker_lost``)."""
    job.finished = True
    # The worker may only be stopped: tell it, for when it resumes, that nobody reads this job.
    await job.give_up(keep=ABANDONED_SECONDS)
    await job.cancel(force=True)
    raise ServiceUnavailable(
        f"The worker running this generation ({job.worker}) stopped responding.",
        code="worker_lost",
    )


async def read_final_usage(job: GenerationJob) -> None:
    """After its client left: read what the worker still sends, up to ``Done`` and its exact usage."""
    deadline = time.monotonic() + DRAIN_SECONDS
    try:
        while (left := deadline - time.monotonic()) > 0:
            event = await job.next_event(left)
            if event is None or isinstance(event, wire.Error):
                break
            if isinstance(event, wire.Done):
                job.usage = event.usage
                break
    except APIError:
        pass


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
        # A receive that a timeout may cancel without losing a message is awaited directly; any other is kept
        # pending across timeouts.
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
