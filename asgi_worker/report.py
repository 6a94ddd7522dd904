"""Reporting: a job's events out to its reply channel, and the worker's heartbeat into the registry.

Scaled, the heartbeat also renews the worker's claims and its group membership (a restarted Redis forgets both),
and a watcher stops the jobs whose web process stopped beating: nobody can read them any more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from channels.exceptions import ChannelFull

from asgi_worker.pull import Claims
from asgi_worker.run import Runs
from tripod import job_protocol as wire
from tripod.registry import REGISTRY_ERRORS, WorkerRegistry

# The worker's log lines keep one logger name, whichever of its modules writes them.
logger = logging.getLogger("asgi_worker.loop")


async def send_event(layer: Any, reply_channel: str, event: wire.Message) -> bool:
    """Send an event; False when the reply channel is full or unreachable (its reader is gone)."""
    try:
        await layer.send(reply_channel, wire.encode(event))
        return True
    except ChannelFull:
        return False
    except REGISTRY_ERRORS as exc:
        logger.warning("could not send to %s: %s", reply_channel, exc)
        return False


async def heartbeat(
    registry: WorkerRegistry,
    beat: Callable[[], wire.WorkerBeat],
    join_group: Callable[[], Awaitable[None]],
    claims: Claims,
    runs: Runs,
    interval: float,
) -> None:
    """Beat every ``interval``; stop the jobs whose claim this worker lost (given up while it was stopped)."""
    while True:
        try:
            await registry.beat(beat())
            # Refresh group membership too: a restarted Redis has forgotten it.
            await join_group()
            for job_id in await claims.renew():
                logger.warning("job %s: its client gave it up or another worker took it; stopping it", job_id)
                runs.give_up(job_id)
        except REGISTRY_ERRORS as exc:
            logger.warning("heartbeat failed: %s", exc)
        await asyncio.sleep(interval)


async def watch_readers(registry: WorkerRegistry, runs: Runs, interval: float) -> None:
    """Stop the jobs whose web process stopped beating: nobody can read them any more.

    A web process must be missing at two checks in a row: a restarted Redis has forgotten every key
    until the next beat.
    """
    missing: set[str] = set()
    while True:
        await asyncio.sleep(interval)
        webs = set(runs.readers.values())
        if not webs:
            missing.clear()
            continue
        try:
            gone = webs - await registry.live_webs(webs)
        except REGISTRY_ERRORS as exc:
            logger.warning("could not check the web processes of running jobs: %s", exc)
            continue
        dead, missing = gone & missing, gone
        for job_id, web in list(runs.readers.items()):
            stream = runs.running.get(job_id)
            if web in dead and stream is not None:
                logger.warning("job %s: its web process %s stopped beating; stopping the job", job_id, web)
                runs.readers.pop(job_id, None)
                stream.cancel()
