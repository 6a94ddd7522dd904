"""The job client every transport shares: ``GenerationJob`` submits a generation to a worker and yields its deltas.

REST, SSE and WebSocket differ only in how they frame what it yields. It keeps the job's state and its lifecycle
(start, read, cancel, close); admission (``job_admission``, ``job_queue``, ``served_models``), the event reader
(``job_events``) and settlement (``job_settlement``) are its parts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer

from consumers.job_admission import admit
from consumers.job_events import ReplyReader, read_deltas, read_final_usage
from consumers.job_queue import QueuedJob, layer_down
from consumers.job_settlement import settle
from tripod import job_protocol as wire
from tripod.accounts.keys import OPEN, Principal
from tripod.accounts.ratelimit import Lease
from tripod.conf import config
from tripod.engines.base import Delta
from tripod.errors import APIError
from tripod.observability.logs import REQUEST_ID
from tripod.observability.metrics import RequestMetrics
from tripod.patches.request_threads import outlive_request
from tripod.protocol import GenerationRequest
from tripod.registry import REGISTRY_ERRORS
from tripod.responses import ReplyText


class GenerationJob:
    """One generation as its client sees it: ``start()``, iterate ``deltas()``, ``close()``.

    Leaving early (an exception, a cancelled task, a client that hung up) must reach ``close()``,
    which tells the worker to stop; use ``async with``.
    """

    def __init__(
        self,
        request: GenerationRequest,
        principal: Principal = OPEN,
        *,
        transport: str = "rest",
        request_id: str | None = None,
    ) -> None:
        self.request = request
        self.principal = principal
        self.transport = transport
        self.lease: Lease | None = None
        self.model = request.model or config().served_model_name
        # Unique per job (cancels and claims use it); request_id is the caller's, for logs.
        self.id = uuid.uuid4().hex
        self.request_id = request_id or REQUEST_ID.get() or self.id
        self.metrics: RequestMetrics | None = None
        self.error: APIError | None = None
        self.created = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.completion_text: list[str] | None = [] if config().log_content else None
        self.layer = get_channel_layer()
        self.events = ReplyReader(self.layer)
        self.queued: QueuedJob | None = None
        self.worker: str | None = None
        self.control_channel: str | None = None
        self.prompt_tokens = 0
        self.tokens_seen = 0  # completion tokens received, for a job that ends with no usage report
        self.finish_reason: str | None = None
        self.finish_reasons: list[str | None] = [None] * request.params.n  # one per choice, once done
        self.cancelled = False
        self.usage: dict[str, int] | None = None
        self.finished = False
        self._cancel_sent = False
        self._settled = False
        self._closed = False

    @property
    def reply_channel(self) -> str | None:
        """Where the worker sends this job's events; ``None`` until the job is submitted."""
        return self.events.channel

    async def __aenter__(self) -> GenerationJob:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def start(self) -> None:
        """Submit the job and wait until a worker has admitted it; errors raise ``APIError``."""
        try:
            await admit(self)
        except APIError as error:
            self.error = error
            raise

    async def deltas(self, tick: float | None = None) -> AsyncIterator[Delta | None]:
        """Yield deltas until the job is done; ``None`` every ``tick`` seconds of silence (for keep-alives).

        Raises ``APIError`` on a worker error, or when the worker sends nothing for ``event_timeout``.
        """
        try:
            async for delta in read_deltas(self, tick):
                yield delta
        except APIError as error:
            self.error = error
            raise

    async def result(self) -> ReplyText:
        """Run to the end and return every choice's text, tool calls and logprobs (non-streaming requests)."""
        await self.start()
        params = self.request.params
        reply = ReplyText(params.n, params.logprobs)
        async for delta in self.deltas():
            if delta is not None:
                reply.add(delta)
        return reply

    async def cancel(self, *, force: bool = False) -> None:
        """Ask the worker to stop; its ``done`` event (with exact usage) still arrives."""
        if (self.finished and not force) or self._cancel_sent:
            return
        self._cancel_sent = True
        message = wire.encode(wire.Cancel(self.id))
        try:
            if self.control_channel:
                await self.layer.send(self.control_channel, message)
            else:
                # Not admitted yet (or admission unseen): every worker hears it and skips the job.
                await self.layer.group_send(wire.WORKERS_GROUP, message)
        except (ChannelFull, *REGISTRY_ERRORS):
            pass  # the worker notices its reader is gone when its own sends fail

    async def give_up(self, keep: float | None = None) -> None:
        """Scaled: mark the job abandoned, so that no worker starts it and a worker that holds it stops it."""
        if self.queued is not None:
            await self.queued.give_up(keep)

    async def close(self) -> None:
        """Stop the worker if the job is unfinished, stop listening, settle limits and usage; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.reply_channel is not None and not self.finished:
            await self.cancel()
            if self.control_channel is None:
                await self.give_up()  # not admitted: no copy of it may start now
            else:
                # Admitted: its worker still reports the exact usage of what it generated. Read it in the
                # background (the client is gone; nothing waits), so limits and usage count those tokens and
                # no event is left behind in the channel layer.
                self.finished = True
                outlive_request(self._drain_then_settle(), self.request_id)
                return
        self.finished = True
        self.events.close()
        await self._settle()

    async def _drain_then_settle(self) -> None:
        try:
            await read_final_usage(self)
        finally:
            self.events.close()
            await self._settle()

    async def _settle(self) -> None:
        first, self._settled = not self._settled, True
        await settle(self, first=first)

    async def next_event(self, timeout: float) -> wire.Message | None:
        """The next event on the reply channel, or ``None`` after ``timeout``; a failed layer ends the job (503)."""
        try:
            return await self.events.next_event(timeout)
        except REGISTRY_ERRORS as exc:
            self.finished = True
            raise layer_down(exc) from None
