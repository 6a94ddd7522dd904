"""Pulling jobs: one ``receive()`` on the model's job channel per free slot, and the claim that makes a job this
worker's alone.

A backlog stays in the channel layer, where another worker can take it. Scaled, each job is claimed in the
registry before it starts and the claim renewed with every heartbeat, so a worker that resumes after a stop
finds out which of its jobs went to another worker or were given up by their clients.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from tripod.errors import channel_layer_unavailable
from tripod.registry import REGISTRY_ERRORS, WorkerRegistry

# The worker's log lines keep one logger name, whichever of its modules writes them.
logger = logging.getLogger("asgi_worker.loop")
# How long to wait before reading again from a channel layer that failed.
RETRY_SECONDS = 0.5


async def pull_jobs(
    layer: Any,
    job_channel: str,
    free: asyncio.Semaphore,
    stopping: asyncio.Event,
    serve: Callable[[dict[str, Any]], Awaitable[None]],
    tasks: set[asyncio.Task],
) -> None:
    """Until ``stopping``: take a slot, then one job, and serve it in a task of ``tasks`` that frees the slot."""
    stop = asyncio.create_task(stopping.wait())
    try:
        while not stopping.is_set():
            acquire = asyncio.create_task(free.acquire())
            await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not acquire.done():
                acquire.cancel()
                break
            receive = asyncio.create_task(layer.receive(job_channel))
            await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                # channels_redis keeps a message popped by a cancelled receive in its backup queue.
                receive.cancel()
                free.release()
                break
            try:
                job = receive.result()
            except REGISTRY_ERRORS as exc:
                free.release()
                logger.warning("channel layer unavailable (%s); retrying", exc)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            task = asyncio.create_task(serve(job))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        stop.cancel()


class Claims:
    """The jobs this worker has claimed in the registry and not yet ended (scaled only)."""

    def __init__(self, registry: WorkerRegistry, worker_id: str) -> None:
        self.registry = registry
        self.worker_id = worker_id
        self.held: set[str] = set()

    async def claim(self, job_id: str) -> bool:
        """Make the job this worker's; False when another worker has it, it ended, or its client gave it up."""
        try:
            claimed = await self.registry.claim(job_id, self.worker_id)
        except REGISTRY_ERRORS as exc:  # a 503 the client may retry, not an engine failure
            logger.warning("job %s: could not claim it: %s", job_id, exc)
            raise channel_layer_unavailable(exc) from None
        if claimed:
            self.held.add(job_id)
        return claimed

    async def still_holds(self, job_id: str) -> bool:
        """Whether the claim is still this worker's (it may have been stopped since it claimed)."""
        try:
            return await self.registry.holds(job_id, self.worker_id)
        except REGISTRY_ERRORS:
            return True  # the heartbeat's renewal checks again

    async def release(self, job_id: str, deadline: float) -> None:
        """End the claim of a job that ended, if this worker holds it."""
        if job_id not in self.held:
            return
        self.held.discard(job_id)
        try:
            await self.registry.release(job_id, self.worker_id, deadline)
        except REGISTRY_ERRORS as exc:  # the claim expires by itself
            logger.warning("job %s: could not end its claim: %s", job_id, exc)

    async def renew(self) -> list[str]:
        """Keep the claims alive; return the jobs whose claim was lost (given up while this worker was stopped)."""
        return list(await self.registry.renew_claims(sorted(self.held), self.worker_id))
