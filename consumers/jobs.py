"""The job client every transport shares: submit a generation to a worker and read its events.

REST, SSE and WebSocket differ only in how they frame what this yields.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from channels.layers import get_channel_layer

from tripod import events
from tripod.conf import WORKERS_GROUP, config, job_channel_for
from tripod.engines.base import Delta
from tripod.errors import APIError, EngineFailure, ModelNotFound, ServiceUnavailable
from tripod.protocol import GenerationRequest


def served_models() -> list[str]:
    """Names of the models this deployment serves."""
    return [config().served_model_name]


def resolve_model(requested: str | None) -> str:
    """The served model a request asks for; no ``model`` means the default one."""
    models = served_models()
    if requested is None:
        return models[0]
    if requested not in models:
        raise ModelNotFound(requested)
    return requested


class GenerationJob:
    """One generation as its client sees it: ``start()``, iterate ``deltas()``, ``close()``.

    Leaving early (an exception, a cancelled task, a client that hung up) must reach ``close()``,
    which tells the worker to stop; use ``async with``.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.model = resolve_model(request.model)
        self.id = uuid.uuid4().hex
        self.layer = get_channel_layer()
        self.reply_channel: str | None = None
        self.worker: str | None = None
        self.control_channel: str | None = None
        self.prompt_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.usage: dict[str, int] | None = None
        self.finished = False
        self._cancel_sent = False
        self._pending: asyncio.Future | None = None

    async def __aenter__(self) -> GenerationJob:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Submit the job and wait until a worker has admitted it; errors raise ``APIError``."""
        cfg = config()
        if self.layer.__class__.__name__ == "InMemoryChannelLayer":
            from asgi_worker.inline import ensure_inline_worker

            ensure_inline_worker()
        self.reply_channel = await self.layer.new_channel("tripod.reply.")
        job: dict[str, Any] = {
            "type": events.JOB,
            "id": self.id,
            "reply_channel": self.reply_channel,
            "model": self.model,
            "params": self.request.params.to_message(),
            "deadline": time.time() + cfg.queue_timeout,
        }
        if self.request.kind == "chat":
            job["messages"] = self.request.messages
        else:
            job["prompt"] = self.request.prompt
        await self.layer.send(job_channel_for(self.model), job)
        event = await self._next_event(cfg.queue_timeout)
        if event is None:
            raise ServiceUnavailable(
                f"No worker for model '{self.model}' accepted the request within {cfg.queue_timeout:g} s.",
                code="no_worker_available",
            )
        if event["type"] == events.ERROR:
            self.finished = True
            raise APIError.from_event(event)
        if event["type"] != events.STARTED:
            raise EngineFailure(f"Unexpected event from the worker: {event['type']}", code="protocol_error")
        self.worker = event.get("worker")
        self.control_channel = event.get("control")
        self.prompt_tokens = int(event.get("prompt_tokens", 0))

    async def deltas(self, tick: float | None = None) -> AsyncIterator[Delta | None]:
        """Yield deltas until the job is done; ``None`` every ``tick`` seconds of silence (for keep-alives).

        Raises ``APIError`` on a worker error, or when the worker sends nothing for ``event_timeout``.
        """
        timeout = config().event_timeout
        silent_since = time.monotonic()
        while not self.finished:
            wait = timeout - (time.monotonic() - silent_since)
            if wait <= 0:
                raise EngineFailure(
                    f"The worker sent nothing for {timeout:g} s; giving up on this generation.",
                    code="worker_timeout",
                    status=504,
                )
            event = await self._next_event(min(wait, tick) if tick else wait)
            if event is None:
                if tick:
                    yield None
                continue
            silent_since = time.monotonic()
            kind = event["type"]
            if kind == events.DELTA:
                yield Delta(event["text"], int(event.get("tokens", 0)))
            elif kind == events.DONE:
                self.finished = True
                self.finish_reason = event.get("finish_reason")
                self.cancelled = self.finish_reason is None
                self.usage = event.get("usage")
            elif kind == events.ERROR:
                self.finished = True
                raise APIError.from_event(event)

    async def result(self) -> str:
        """Run to the end and return the whole text (non-streaming requests)."""
        await self.start()
        return "".join([delta.text async for delta in self.deltas() if delta is not None])

    async def cancel(self) -> None:
        """Ask the worker to stop; its ``done`` event (with exact usage) still arrives."""
        if self.finished or self._cancel_sent:
            return
        self._cancel_sent = True
        message = {"type": events.CANCEL, "id": self.id}
        if self.control_channel:
            await self.layer.send(self.control_channel, message)
        else:
            # Not admitted yet (or admission unseen): every worker hears it and skips the job.
            await self.layer.group_send(WORKERS_GROUP, message)

    async def close(self) -> None:
        """Stop the worker if the job is unfinished and stop listening; idempotent."""
        if self.reply_channel is not None and not self.finished:
            await self.cancel()
        self.finished = True
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self._pending = None

    async def _next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event on the reply channel, or ``None`` after ``timeout`` (the receive stays pending)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.layer.receive(self.reply_channel))
        done, _ = await asyncio.wait({self._pending}, timeout=max(timeout, 0))
        if not done:
            return None
        future, self._pending = self._pending, None
        return future.result()
