"""Resumable SSE: a generation that outlives its reader's connection.

``begin`` admits the job (errors are the POST's answer), then a task on this process's event loop — not
tied to any connection — copies the job's chunks into the stream store (:mod:`tripod.streams`). Readers
``GET`` the stream: every frame carries ``id:``, and a reader that reconnects with ``Last-Event-ID``
continues right after it. A reader leaving does not stop the generation; ``DELETE`` does, and so does
having no reader at all for ``TRIPOD_STREAM_READER_TIMEOUT`` seconds (nobody would see the result).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer

from consumers.jobs import GenerationJob
from consumers.sse import DONE, KEEPALIVE, frame
from tripod import job_protocol as wire
from tripod import streams
from tripod.conf import config
from tripod.errors import APIError, EngineFailure
from tripod.patches.request_threads import outlive_request
from tripod.registry import REGISTRY_ERRORS
from tripod.responses import ChunkBuilder, compact_json

logger = logging.getLogger(__name__)
# How soon a browser's EventSource retries after a dropped connection (the SSE ``retry:`` field).
RETRY_MS = 1000
# How often a stream's generation checks that someone still reads it, and a reader says it is there.
READER_CHECK_SECONDS = 1.0


async def begin(job: GenerationJob) -> dict[str, Any]:
    """Start copying an admitted ``job``'s frames into the store; return the stream's description."""
    cfg = config()
    store = streams.get_store()
    stream_id = streams.new_stream_id()
    info = streams.StreamInfo(stream_id, job.id, job.control_channel or "", job.model, None)
    try:
        await store.create(info)
    except REGISTRY_ERRORS as exc:
        await job.close()
        raise APIError(
            f"The stream store (Redis) is unavailable: {exc}", code="stream_store_unavailable", status=503
        ) from None
    outlive_request(_produce(job, stream_id, store), job.request_id)
    expires_at = int(time.time() + cfg.stream_ttl)
    return {
        "id": stream_id,
        "object": "stream",
        "model": job.model,
        "created": int(time.time()),
        "url": f"/v1/streams/{stream_id}?token={streams.sign(stream_id, expires_at)}",
        "expires_at": expires_at,
    }


async def _produce(job: GenerationJob, stream_id: str, store: streams.StreamStore) -> None:
    request = job.request
    builder = ChunkBuilder(request.kind, job.model, request.include_usage, request.params.logprobs)
    frame_id = 0

    async def put(text: str) -> None:
        nonlocal frame_id
        frame_id += 1
        await store.append(stream_id, streams.Frame(frame_id, text))

    reader_timeout = config().stream_reader_timeout
    checked_at = time.monotonic()
    async with job:
        try:
            try:
                for chunk in builder.opening(request.params.n):
                    await put(compact_json(chunk))
                async for delta in job.deltas(tick=READER_CHECK_SECONDS):
                    if delta is not None and (delta.text or delta.tool_calls or delta.logprobs):
                        await put(builder.render(delta))
                    if reader_timeout and time.monotonic() - checked_at >= READER_CHECK_SECONDS:
                        checked_at = time.monotonic()
                        if time.time() - await store.last_reader(stream_id) > reader_timeout:
                            # Nobody has read this stream for a while: stop spending the engine on it.
                            logger.info("stream %s: no reader for %g s, cancelling", stream_id, reader_timeout)
                            await job.cancel()
                for index in range(request.params.n):
                    reason = "cancelled" if job.cancelled else job.finish_reasons[index]
                    await put(compact_json(builder.finish(reason, index)))
                if request.include_usage:
                    await put(compact_json(builder.usage(job.usage)))
            except APIError as error:
                await put(compact_json(error.to_dict()))
            await put(streams.DONE)
        except REGISTRY_ERRORS as exc:
            # The store is gone: nobody can read what follows, so stop generating (closing the job does).
            logger.warning("stream %s: the store failed, cancelling its generation: %r", stream_id, exc)
        except Exception:
            logger.exception("stream %s: copying the generation failed", stream_id)


async def cancel(info: streams.StreamInfo) -> None:
    """Tell the stream's worker to stop; its final frames (finish ``cancelled``, usage) still arrive."""
    if info.last_id is not None or not info.control_channel:
        return
    try:
        await get_channel_layer().send(info.control_channel, wire.encode(wire.Cancel(info.job_id)))
    except (ChannelFull, *REGISTRY_ERRORS):
        pass  # the worker is gone or drowning; its generation ends by itself


def _numbered(stored: streams.Frame) -> bytes:
    return f"id: {stored.id}\ndata: {stored.data}\n\n".encode()


async def replay(stream_id: str, after: int) -> AsyncIterator[bytes]:
    """The stream's frames after ``after``, then the live ones, until ``[DONE]``."""
    cfg = config()
    store = streams.get_store()
    yield f"retry: {RETRY_MS}\n\n".encode()
    last_frame_at = last_sent_at = time.monotonic()
    present_at = float("-inf")
    while True:
        try:
            if time.monotonic() - present_at >= READER_CHECK_SECONDS / 2:
                present_at = time.monotonic()
                await store.reader_present(stream_id)
            frames = await store.read(stream_id, after, min(cfg.sse_keepalive, READER_CHECK_SECONDS))
        except REGISTRY_ERRORS as exc:
            error = APIError(f"The stream store (Redis) is unavailable: {exc}", code="stream_store_unavailable")
            yield frame(error.to_dict())
            return
        if not frames:
            if time.monotonic() - last_frame_at > cfg.event_timeout + cfg.sse_keepalive:
                # The process copying this generation died: nothing more will come.
                error = EngineFailure(
                    f"Stream {stream_id} received nothing for {cfg.event_timeout:g} s; its generation was lost.",
                    code="stream_stalled",
                )
                yield frame(error.to_dict()) + DONE
                return
            if time.monotonic() - last_sent_at >= cfg.sse_keepalive:
                last_sent_at = time.monotonic()
                yield KEEPALIVE
            continue
        last_frame_at = last_sent_at = time.monotonic()
        yield b"".join(_numbered(stored) for stored in frames)
        after = frames[-1].id
        if frames[-1].last:
            return
