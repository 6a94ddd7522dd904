"""Serving one pulled job to its end: decoded, skipped or claimed, generated, answered, and its slot freed.

A job this worker cannot read is answered where it says to (``protocol_error``, or ``protocol_mismatch`` for another
version); one cancelled, expired or claimed by another worker ends without a word; a failed one ends its stream
with an error. Each delta carries as many tokens as the job asks, or, for ``auto``, as the worker's load suggests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from asgi_worker.report import send_event
from tripod import job_protocol as wire
from tripod.conf import STREAM_INTERVAL_AUTO
from tripod.errors import APIError, EngineFailure
from tripod.observability import metrics
from tripod.observability.logs import REQUEST_ID

if TYPE_CHECKING:
    from asgi_worker.loop import Worker

# The worker's log lines keep one logger name, whichever of its modules writes them.
logger = logging.getLogger("asgi_worker.loop")

# TRIPOD_STREAM_INTERVAL=auto: one more token per streamed chunk for each this many generations running on the
# worker, up to AUTO_MAX_INTERVAL.
AUTO_STREAMS_PER_TOKEN = 16
AUTO_MAX_INTERVAL = 4


def auto_stream_interval(generations: int) -> int:
    """Tokens per streamed chunk after the first, for ``TRIPOD_STREAM_INTERVAL=auto`` with ``generations`` running.

    Up to 16 generations every token goes out as it comes; 17 to 32 get chunks of 2, and so on up to 4. Each
    chunk costs the server about the same whatever it holds (an event through the channel layer, an SSE or
    WebSocket frame, a ``send`` system call), and the server shares the process, and Python's lock, with the
    engine's batching thread, so fewer, larger chunks leave it more time (measured in docs/BENCHMARKS.md,
    "``TRIPOD_STREAM_INTERVAL=auto``").
    """
    return max(1, min(AUTO_MAX_INTERVAL, -(-generations // AUTO_STREAMS_PER_TOKEN)))


async def serve(worker: Worker, message: dict[str, Any]) -> None:
    """Take one message from the job channel to its end; the slot it was pulled with is free again after."""
    try:
        job = wire.decode(message)
        if not isinstance(job, wire.Job):
            raise wire.ProtocolError(f"A job channel carries jobs, not '{job.TYPE}' messages.")
    except wire.ProtocolError as exc:
        await _refuse(worker, exc)
        return
    REQUEST_ID.set(str(job.request_id or job.id))  # this task's logs carry the request id
    try:
        if worker.runs.was_cancelled(job.id):
            return
        if time.time() > job.deadline:
            # The client stopped waiting for a worker; nobody reads this reply channel any more.
            return
        if worker.claims is not None and not await worker.claims.claim(job.id):
            logger.info("job %s is served by another worker, ended, or given up", job.id)
            return
        await _generate(worker, job)
    except APIError as exc:
        await send_event(worker.layer, job.reply_channel, wire.Error.from_error(job.id, exc))
    except Exception as exc:  # noqa: BLE001 - a failed job must end its stream with an error
        logger.exception("job %s failed", job.id)
        error = EngineFailure(f"The engine failed: {exc}", code="engine_error")
        await send_event(worker.layer, job.reply_channel, wire.Error.from_error(job.id, error))
    finally:
        if worker.claims is not None:
            await worker.claims.release(job.id, job.deadline)
        worker.runs.forget(job.id)
        worker.free_slots.release()


async def _refuse(worker: Worker, exc: wire.ProtocolError) -> None:
    """Answer a job this worker cannot read (``protocol_mismatch``: another version) where it says to."""
    try:
        logger.warning("refusing job %r: %s", exc.job_id, exc)
        if exc.reply_channel:
            await send_event(worker.layer, exc.reply_channel, exc.to_event())
    finally:
        worker.free_slots.release()


async def _generate(worker: Worker, job: wire.Job) -> None:
    """Run the job on the engine: ``Started`` first, then its deltas and ``Done``, unless it stops early."""
    stream = await worker.runs.start(job, await worker.model(), worker.executor)
    labels = worker.metric_labels
    metrics.WORKER_RUNNING.labels(**labels).inc()
    send = partial(send_event, worker.layer)
    try:
        started = wire.Started(job.id, worker.id, worker.control_channel, stream.prompt_tokens, stream.max_tokens)
        if worker.claims is not None and not await worker.claims.still_holds(job.id):
            # Stopped between the claim and here, long enough for the job to go to another worker or be given
            # up: its reply channel is someone else's now. The relay below sends nothing and frees the stream.
            logger.warning("job %s: lost its claim before it started; dropping it", job.id)
            worker.runs.give_up(job.id)
        elif not await send(job.reply_channel, started):
            stream.cancel()
        interval, hold = _stream_interval(worker, job), float(job.stream_hold)
        await worker.runs.relay(job.id, job.reply_channel, stream, send, interval, hold)
    finally:
        worker.runs.end(job.id)
        metrics.WORKER_RUNNING.labels(**labels).dec()
        metrics.WORKER_GENERATION_TOKENS.labels(**labels).inc(stream.completion_tokens)
        logger.info(
            "job %s finished: finish_reason=%s prompt_tokens=%d completion_tokens=%d",
            job.id,
            stream.finish_reason or "cancelled",
            stream.prompt_tokens,
            stream.completion_tokens,
        )


def _stream_interval(worker: Worker, job: wire.Job) -> int | Callable[[], int]:
    """Tokens per delta after the first, as the job asks; for ``auto``, asked again before each delta."""
    interval = job.stream_interval
    if interval == STREAM_INTERVAL_AUTO:
        return lambda: auto_stream_interval(len(worker.runs.running))
    return int(interval)
