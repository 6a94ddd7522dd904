"""Server-Sent Events framing of a generation: OpenAI's ``data: <chunk>`` frames, then ``data: [DONE]``.

The body is an async generator that Django's ASGI handler runs on the event loop. When the client
hangs up, Django cancels it (Django >= 5.0), and ``finally`` tells the worker to stop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from asgiref.sync import async_to_sync
from django.http import StreamingHttpResponse

from consumers.jobs import GenerationJob
from tripod.conf import config
from tripod.errors import APIError
from tripod.responses import ChunkBuilder, compact_json

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def frame(payload: dict | str) -> bytes:
    """One ``data:`` event: a chunk or error, or its JSON already rendered."""
    data = payload if isinstance(payload, str) else compact_json(payload)
    return b"data: " + data.encode() + b"\n\n"


async def event_stream(job: GenerationJob) -> AsyncIterator[bytes]:
    """Frames for an admitted job: deltas, the finish chunk, the usage chunk if asked, ``[DONE]``."""
    request = job.request
    builder = ChunkBuilder(request.kind, job.model, request.include_usage, request.params.logprobs)
    try:
        try:
            for chunk in builder.opening(request.params.n):
                yield frame(chunk)
            async for delta in job.deltas(tick=config().sse_keepalive):
                if delta is None:
                    yield KEEPALIVE
                elif delta.text or delta.tool_calls or delta.logprobs:
                    yield frame(builder.render(delta))
        except APIError as error:
            yield frame(error.to_dict())
            yield DONE
            return
        for index in range(request.params.n):
            yield frame(builder.finish(job.finish_reasons[index], index))
        if request.include_usage:
            yield frame(builder.usage(job.usage))
        yield DONE
    finally:
        await job.close()


def event_stream_response(body: AsyncIterator[bytes]) -> StreamingHttpResponse:
    """A ``text/event-stream`` response that no cache or proxy holds back."""
    response = StreamingHttpResponse(body, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


def streaming_response(job: GenerationJob) -> StreamingHttpResponse:
    """The ``text/event-stream`` response for an admitted job."""
    response = event_stream_response(event_stream(job))
    # If the client leaves before the body starts, the generator never runs; closing the response
    # still stops the worker.
    response._resource_closers.append(async_to_sync(job.close))
    return response
