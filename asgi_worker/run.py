"""Running jobs: each job's generation on the engine, the relay of its deltas, and the ways it stops early.

A job stops early when its client cancels (the job may not have been pulled yet: the cancel is remembered),
when its claim went to another worker or its client gave it up (it ends without a word), or when the worker
shuts down before it finished (``worker_shutdown``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from contextlib import aclosing
from functools import partial
from typing import Any

from asgi_worker.pull import RETRY_SECONDS
from tripod import job_protocol as wire
from tripod.engines.base import ChatModel
from tripod.engines.reply import Reply
from tripod.errors import ServiceUnavailable
from tripod.registry import REGISTRY_ERRORS

# The worker's log lines keep one logger name, whichever of its modules writes them.
logger = logging.getLogger("asgi_worker.loop")

# Remember cancels of jobs not pulled yet for this long (a job waits at most the queue timeout).
CANCEL_MEMORY_SECONDS = 600

Send = Callable[[str, wire.Message], Awaitable[bool]]


class Runs:
    """The generations running on one worker, and the cancels, give-ups and aborts that stop them."""

    def __init__(self) -> None:
        self.running: dict[str, Reply] = {}
        # The web process that reads each running job, where the job names one (scaled).
        self.readers: dict[str, str] = {}
        self._cancelled: dict[str, float] = {}
        self._aborted: set[str] = set()
        # Jobs whose claim went elsewhere: they end without a word.
        self._given_up: set[str] = set()

    def cancel(self, job_id: str) -> None:
        """Stop a running job, or remember to skip it if it is still waiting in the channel."""
        stream = self.running.get(job_id)
        if stream is not None:
            stream.cancel()
            return
        now = time.monotonic()
        self._cancelled = {k: t for k, t in self._cancelled.items() if t > now}
        self._cancelled[job_id] = now + CANCEL_MEMORY_SECONDS

    def was_cancelled(self, job_id: str) -> bool:
        """Whether the job's client cancelled it before it started (and forget that it did)."""
        return self._cancelled.pop(job_id, None) is not None

    def give_up(self, job_id: str) -> None:
        """Stop a job that is no longer this worker's: no event of it may reach its reply channel any more."""
        self._given_up.add(job_id)
        stream = self.running.get(job_id)
        if stream is not None:
            stream.cancel()
        else:
            self.cancel(job_id)  # still loading or tokenizing: stopped as it starts

    def abort_all(self) -> None:
        """Shutting down: stop every running job; each ends with ``worker_shutdown``."""
        for job_id, stream in list(self.running.items()):
            self._aborted.add(job_id)
            stream.cancel()

    def forget(self, job_id: str) -> None:
        """The job's task ended and its claim is released: drop what was kept about it."""
        self._aborted.discard(job_id)
        self._given_up.discard(job_id)

    async def start(self, job: wire.Job, model: ChatModel, executor: Executor) -> Reply:
        """Start the job's generations, one per choice (tokenizing and admitting them block, so on ``executor``),
        and track them."""
        limits = {"max_prompt_tokens": job.max_prompt_tokens, "max_tokens_cap": job.max_tokens_cap}
        loop = asyncio.get_running_loop()
        stream = await loop.run_in_executor(executor, partial(model.start_reply, job.input, job.params, **limits))
        self.running[job.id] = stream
        if job.web:
            self.readers[job.id] = job.web
        if self.was_cancelled(job.id):
            stream.cancel()  # the client left while the job was loading or tokenizing
        return stream

    def end(self, job_id: str) -> None:
        """The job's generation ended: it no longer counts as running."""
        self.running.pop(job_id, None)
        self.readers.pop(job_id, None)

    async def relay(
        self, job_id: str, reply: str, stream: Reply, send: Send, interval: int | Callable[[], int], hold: float
    ) -> None:
        """Relay the stream's deltas, merged as the job asks (``interval`` and ``hold``: ``TokenStream.deltas_async``).

        Whatever arrived while the last send was in flight goes out as one delta.
        """
        seq = 0
        async with aclosing(stream.deltas_async(interval, hold)) as deltas:
            async for delta in deltas:
                message = wire.Delta.from_engine(job_id, seq, delta)
                seq += 1
                if job_id in self._given_up or not await send(reply, message):
                    return  # the reader is gone: leaving the loop cancels the generation
        if job_id in self._given_up:
            return  # not this worker's job any more: its client heard, or hears, from another
        if job_id in self._aborted:
            raise ServiceUnavailable("The worker shut down before this generation finished.", code="worker_shutdown")
        reasons = stream.finish_reasons
        await send(reply, wire.Done(job_id, reasons[0], stream.usage(), reasons if len(reasons) > 1 else None))


async def listen_for_cancels(layer: Any, control_channel: str, runs: Runs) -> None:
    """Apply every cancel that arrives on the worker's control channel (its own, or the group's)."""
    while True:
        try:
            message = await layer.receive(control_channel)
        except REGISTRY_ERRORS:
            await asyncio.sleep(RETRY_SECONDS)
            continue
        try:
            cancel = wire.decode(message)
        except wire.ProtocolError as exc:
            logger.warning("ignoring a malformed control message: %s", exc)
            continue
        if isinstance(cancel, wire.Cancel):
            runs.cancel(cancel.id)
