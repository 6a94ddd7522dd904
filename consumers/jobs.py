"""The job client every transport shares: submit a generation to a worker and read its events.

REST, SSE and WebSocket differ only in how they frame what this yields.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer

from consumers.job_admission import Admission, layer_down, reserve_exactly
from consumers.job_events import ReplyReader
from consumers.job_settlement import settle
from tripod import job_protocol as wire
from tripod.accounts.keys import OPEN, Principal
from tripod.accounts.ratelimit import Lease, admit
from tripod.conf import config
from tripod.engines.base import Delta
from tripod.errors import APIError, EngineFailure, InvalidRequest, ModelNotFound, ServiceUnavailable
from tripod.observability.logs import REQUEST_ID
from tripod.observability.metrics import RequestMetrics
from tripod.patches.request_threads import outlive_request
from tripod.protocol import GenerationRequest, SamplingParams
from tripod.registry import ABANDONED_SECONDS, REGISTRY_ERRORS, get_registry

# After a client leaves, how long to wait for its worker's final usage report.
DRAIN_SECONDS = 5.0
# A streamed delta held back to gather TRIPOD_STREAM_INTERVAL tokens goes out once this much older than the last.
STREAM_HOLD_SECONDS = 0.5
# The longest a worker holds back the text of a reply that is not streamed.
UNSTREAMED_HOLD_SECONDS = 1.0


async def served_models() -> list[str]:
    """Models a request can name: the configured one, or (scaled) those with a live worker."""
    registry = get_registry()
    if registry is None:
        return [config().served_model_name]
    try:
        return sorted(await registry.live_models())
    except REGISTRY_ERRORS as exc:
        raise layer_down(exc) from None


async def resolve_model(requested: str | None) -> str:
    """The model a request asks for (no ``model`` means the configured default).

    Scaled, a model that has had workers but has none alive right now gets ``no_worker_wait`` seconds
    for one to appear, then a 503; a model no worker ever served is a 404.
    """
    cfg = config()
    name = requested or cfg.served_model_name
    registry = get_registry()
    if registry is None:
        if name != cfg.served_model_name:
            raise ModelNotFound(name)
        return name
    try:
        deadline = time.monotonic() + cfg.no_worker_wait
        while True:
            if name in await registry.live_models():
                return name
            if name not in await registry.known_models() and name != cfg.served_model_name:
                raise ModelNotFound(name)
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(
                    f"No live worker serves the model '{name}'; start one with `python -m asgi_worker --model ...`.",
                    param="model",
                    code="no_worker_available",
                )
            await asyncio.sleep(0.25)
    except REGISTRY_ERRORS as exc:
        raise layer_down(exc) from None


def _check_cap(params: SamplingParams, cap: int) -> None:
    """A ``max_tokens`` above the server's cap is refused; an open-ended request is capped by the worker."""
    if cap and params.max_tokens is not None and params.max_tokens > cap:
        raise InvalidRequest(
            f"'max_tokens' is {params.max_tokens}; this server allows at most {cap}.",
            param="max_tokens",
            code="max_tokens_too_large",
        )


class GenerationJob:
    """One generation as its client sees it: ``start()``, iterate ``deltas()``, ``close()``.

    Leaving early (an exception, a cancelled task, a client that hung up) must reach ``close()``,
    which tells the worker to stop; use ``async with``. Admission (``job_admission``), the reply channel
    (``job_events``) and settlement (``job_settlement``) live in their own modules; this holds what the
    transports read.
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
        self.admission: Admission | None = None
        self.worker: str | None = None
        self.control_channel: str | None = None
        self.prompt_tokens = 0
        self.tokens_seen = 0  # completion tokens received, for a job that ends with no usage report
        self.finish_reason: str | None = None
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
            await self._start()
        except APIError as error:
            self.error = error
            raise

    async def _start(self) -> None:
        cfg = config()
        self.model = await resolve_model(self.request.model)
        _check_cap(self.request.params, cfg.max_tokens_cap)
        try:
            self.lease = await admit(self.principal, self.request, cfg.max_tokens_cap)
        except REGISTRY_ERRORS as exc:
            raise layer_down(exc) from None
        if cfg.inline_worker:
            from asgi_worker.inline import ensure_inline_worker

            ensure_inline_worker()
        try:
            await self._submit(cfg, self.request.params)
        except REGISTRY_ERRORS as exc:
            self.finished = True
            raise layer_down(exc) from None

    async def _submit(self, cfg, params: SamplingParams) -> None:
        reply_channel = await self.events.open()
        chat = self.request.kind == "chat"
        registry = get_registry()
        job = wire.Job(
            id=self.id,
            request_id=self.request_id,
            reply_channel=reply_channel,
            model=self.model,
            params=params,
            messages=self.request.messages if chat else None,
            prompt=None if chat else self.request.prompt,
            max_prompt_tokens=cfg.max_prompt_tokens or None,
            max_tokens_cap=cfg.max_tokens_cap or None,
            deadline=time.time() + cfg.queue_timeout,
            # Scaled: name this web process, so that its workers stop the job if the process dies.
            web=await registry.ensure_web_heartbeat(cfg.heartbeat_interval) if registry is not None else None,
            **self._coalescing(cfg),
        )
        self.metrics = RequestMetrics(self.model, self.transport)
        self.metrics.waiting()
        self.admission = Admission(self.layer, job, self._next_event)
        await self.admission.send()
        event = await self.admission.wait(cfg)
        if event is None:
            raise ServiceUnavailable(
                f"No worker for model '{self.model}' accepted the request within {cfg.queue_timeout:g} s.",
                code="no_worker_available",
            )
        if isinstance(event, wire.Error):
            self.finished = True
            raise event.to_error()
        if not isinstance(event, wire.Started):
            raise EngineFailure(f"Unexpected event from the worker: {event.TYPE}", code="protocol_error")
        self.worker = event.worker
        self.control_channel = event.control
        self.prompt_tokens = int(event.prompt_tokens)
        self.admitted_at = time.monotonic()
        self.metrics.admitted(self.admitted_at - self.created)
        await reserve_exactly(self.lease, self.prompt_tokens, event.max_tokens or params.max_tokens)

    def _coalescing(self, cfg) -> dict[str, Any]:
        """How the worker may merge deltas (``TokenStream.deltas_async``): tokens per delta after the first, and the
        longest a delta may be held back for that. A reply that is not streamed needs only the first delta (its time
        to first token) and a sign of life well within the event timeout; its text can come at the end."""
        if self.transport == "rest":
            return {"stream_interval": 0, "stream_hold": min(UNSTREAMED_HOLD_SECONDS, cfg.event_timeout / 4)}
        return {"stream_interval": cfg.stream_interval, "stream_hold": min(STREAM_HOLD_SECONDS, cfg.event_timeout / 4)}

    async def _give_up(self, keep: float | None = None) -> None:
        if self.admission is not None:
            await self.admission.give_up(keep)

    async def deltas(self, tick: float | None = None) -> AsyncIterator[Delta | None]:
        """Yield deltas until the job is done; ``None`` every ``tick`` seconds of silence (for keep-alives).

        Raises ``APIError`` on a worker error, or when the worker sends nothing for ``event_timeout``.
        """
        try:
            async for delta in self._deltas(tick):
                yield delta
        except APIError as error:
            self.error = error
            raise

    async def _deltas(self, tick: float | None) -> AsyncIterator[Delta | None]:
        cfg = config()
        timeout = cfg.event_timeout
        registry = get_registry()
        # Scaled, a silent worker is checked against its heartbeat this often.
        check = cfg.heartbeat_interval if registry is not None else None
        silent_since = time.monotonic()
        while not self.finished:
            wait = timeout - (time.monotonic() - silent_since)
            if wait <= 0:
                raise EngineFailure(
                    f"The worker sent nothing for {timeout:g} s; giving up on this generation.",
                    code="worker_timeout",
                    status=504,
                )
            event = await self._next_event(min(x for x in (wait, tick, check) if x))
            if event is None:
                if registry is not None and self.worker and not await self._worker_alive(registry):
                    self.finished = True
                    # The worker may only be stopped: tell it, for when it resumes, that nobody reads this job.
                    await self._give_up(keep=ABANDONED_SECONDS)
                    await self.cancel(force=True)
                    raise ServiceUnavailable(
                        f"The worker running this generation ({self.worker}) stopped responding.",
                        code="worker_lost",
                    )
                if tick:
                    yield None
                continue
            silent_since = time.monotonic()
            if isinstance(event, wire.Delta):
                delta = Delta(event.text, int(event.tokens))
                self._observe(delta)
                yield delta
            elif isinstance(event, wire.Done):
                self.finished = True
                self.finish_reason = event.finish_reason
                self.cancelled = self.finish_reason is None
                self.usage = event.usage
            elif isinstance(event, wire.Error):
                self.finished = True
                raise event.to_error()

    def _observe(self, delta: Delta) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            self.metrics.first_token(now - self.created)
            if delta.tokens > 1:
                self.metrics.tokens(0.0, delta.tokens - 1)
        elif delta.tokens:
            self.metrics.tokens(now - self.last_token_at, delta.tokens)
        self.tokens_seen += delta.tokens
        self.last_token_at = now
        if self.completion_text is not None:
            self.completion_text.append(delta.text)

    async def _worker_alive(self, registry) -> bool:
        try:
            return await registry.alive(self.worker)
        except REGISTRY_ERRORS:
            return True  # Redis itself is down: the event timeout still bounds the wait

    async def result(self) -> str:
        """Run to the end and return the whole text (non-streaming requests)."""
        await self.start()
        return "".join([delta.text async for delta in self.deltas() if delta is not None])

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

    async def close(self) -> None:
        """Stop the worker if the job is unfinished, stop listening, settle limits and usage; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.reply_channel is not None and not self.finished:
            await self.cancel()
            if self.control_channel is None:
                await self._give_up()  # not admitted: no copy of it may start now
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
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            while (left := deadline - time.monotonic()) > 0:
                event = await self._next_event(left)
                if event is None or isinstance(event, wire.Error):
                    break
                if isinstance(event, wire.Done):
                    self.usage = event.usage
                    break
        except APIError:
            pass
        finally:
            self.events.close()
            await self._settle()

    async def _settle(self) -> None:
        first, self._settled = not self._settled, True
        await settle(self, first=first)

    async def _next_event(self, timeout: float) -> wire.Message | None:
        """The next event on the reply channel, or ``None`` after ``timeout``; a failed layer ends the job (503)."""
        try:
            return await self.events.next_event(timeout)
        except REGISTRY_ERRORS as exc:
            self.finished = True
            raise layer_down(exc) from None
