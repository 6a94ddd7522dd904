"""The job client every transport shares: submit a generation to a worker and read its events.

REST, SSE and WebSocket differ only in how they frame what this yields.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer

from tripod import job_protocol as wire
from tripod.auth import OPEN, Principal
from tripod.conf import config
from tripod.engines.base import Delta
from tripod.errors import (
    APIError,
    EngineFailure,
    InvalidRequest,
    ModelNotFound,
    ServiceUnavailable,
    channel_layer_unavailable,
)
from tripod.logs import REQUEST_ID
from tripod.metrics import RequestMetrics
from tripod.protocol import GenerationRequest, SamplingParams
from tripod.ratelimit import Lease, admit
from tripod.registry import ABANDONED_SECONDS, CLAIM_MARGIN_SECONDS, REGISTRY_ERRORS, get_registry
from tripod.request_threads import outlive_request
from tripod.usage import record as record_usage

logger = logging.getLogger(__name__)
# After a client leaves, how long to wait for its worker's final usage report.
DRAIN_SECONDS = 5.0
# A streamed delta held back to gather TRIPOD_STREAM_INTERVAL tokens goes out once this much older than the last.
STREAM_HOLD_SECONDS = 0.5
# The longest a worker holds back the text of a reply that is not streamed.
UNSTREAMED_HOLD_SECONDS = 1.0
# Scaled: how often a job is sent again because the worker that took it stopped before starting it.
MAX_RESENDS = 3
# One line per generation request: the access log of the API.
request_log = logging.getLogger("tripod.requests")


def _ms(later: float | None, earlier: float) -> float | None:
    return None if later is None else round((later - earlier) * 1000, 2)


async def served_models() -> list[str]:
    """Models a request can name: the configured one, or (scaled) those with a live worker."""
    registry = get_registry()
    if registry is None:
        return [config().served_model_name]
    try:
        return sorted(await registry.live_models())
    except REGISTRY_ERRORS as exc:
        raise _layer_down(exc) from None


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
        raise _layer_down(exc) from None


def _layer_down(exc: BaseException) -> ServiceUnavailable:
    logger.warning("channel layer unavailable: %r", exc, exc_info=exc)
    return channel_layer_unavailable(exc)


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
        self.reply_channel: str | None = None
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
        self._pending: asyncio.Future | None = None
        # Scaled: the job as sent, when it was last sent (wall time), since when it has looked lost, resends.
        self._job: wire.Job | None = None
        self._deadline: float | None = None
        self._sent_at = 0.0
        self._unclaimed_since: float | None = None
        self._resends = 0
        self._receive_is_cancel_safe = getattr(self.layer, "receive_is_cancel_safe", False)

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
        params = self.request.params
        try:
            self.lease = await admit(self.principal, self.request, cfg.max_tokens_cap)
        except REGISTRY_ERRORS as exc:
            raise _layer_down(exc) from None
        if cfg.inline_worker:
            from asgi_worker.inline import ensure_inline_worker

            ensure_inline_worker()
        try:
            await self._submit(cfg, params)
        except REGISTRY_ERRORS as exc:
            self.finished = True
            raise _layer_down(exc) from None

    async def _submit(self, cfg, params: SamplingParams) -> None:
        self.reply_channel = await self.layer.new_channel(wire.REPLY_CHANNEL_PREFIX)
        chat = self.request.kind == "chat"
        registry = get_registry()
        job = wire.Job(
            id=self.id,
            request_id=self.request_id,
            reply_channel=self.reply_channel,
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
        self._job, self._deadline = job, job.deadline
        await self._send_job()
        event = await self._wait_admission(cfg)
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
        await self._reserve_exactly(event.max_tokens or params.max_tokens)

    async def _reserve_exactly(self, max_tokens: int | None) -> None:
        """Now that the worker has counted the prompt, hold exactly what the job may use (prompt + its token
        budget) instead of the web side's bound; when that is more and does not fit, the job is refused (429)."""
        if self.lease is None or not max_tokens:
            return
        try:
            await self.lease.resize(self.prompt_tokens + int(max_tokens))
        except REGISTRY_ERRORS:
            pass  # keep the bound taken at admission

    def _coalescing(self, cfg) -> dict[str, Any]:
        """How the worker may merge deltas (``TokenStream.deltas_async``): tokens per delta after the first, and the
        longest a delta may be held back for that. A reply that is not streamed needs only the first delta (its time
        to first token) and a sign of life well within the event timeout; its text can come at the end."""
        if self.transport == "rest":
            return {"stream_interval": 0, "stream_hold": min(UNSTREAMED_HOLD_SECONDS, cfg.event_timeout / 4)}
        return {"stream_interval": cfg.stream_interval, "stream_hold": min(STREAM_HOLD_SECONDS, cfg.event_timeout / 4)}

    async def _send_job(self) -> None:
        try:
            await self.layer.send(wire.job_channel(self.model), wire.encode(self._job))
        except ChannelFull:
            raise ServiceUnavailable(
                f"Too many requests are waiting for model '{self.model}'; retry later.", code="queue_full"
            ) from None
        self._sent_at = time.time()
        self._unclaimed_since = None

    async def _wait_admission(self, cfg) -> dict[str, Any] | None:
        """The worker's first event; scaled, give up early once no worker of the model is alive, and send the job
        again when the worker that took it stopped before starting it."""
        registry = get_registry()
        deadline = time.monotonic() + cfg.queue_timeout
        orphaned_since = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            event = await self._next_event(min(left, 1.0) if registry else left)
            if event is not None:
                return event
            if registry is not None:
                if self.model in await registry.live_models():
                    orphaned_since = None
                elif orphaned_since is None:
                    orphaned_since = time.monotonic()
                elif time.monotonic() - orphaned_since > cfg.no_worker_wait:
                    raise ServiceUnavailable(
                        f"No live worker serves the model '{self.model}' any more.",
                        param="model",
                        code="no_worker_available",
                    )
                if await self._lost_before_start(registry, cfg):
                    await self._send_again()

    async def _lost_before_start(self, registry, cfg) -> bool:
        """Whether no live worker has this job: it left the queue but nobody claimed it for ``worker_ttl``, or the
        worker that claimed it stopped beating. A stopped worker may have taken it (a ``SIGSTOP`` during its
        blocking read: Redis hands the job to a process that cannot run), or lost it (that read timed out).
        """
        try:
            if not await registry.left_queue(
                getattr(self.layer, "prefix", "asgi") + wire.job_channel(self.model), self._sent_at
            ):
                self._unclaimed_since = None
                return False  # still waiting its turn
            holder = await registry.claim_holder(self.id)
            if holder is None:
                now = time.monotonic()
                if self._unclaimed_since is None:
                    self._unclaimed_since = now
                return now - self._unclaimed_since >= cfg.worker_ttl
            self._unclaimed_since = None
            return not holder.startswith("!") and not await registry.alive(holder)
        except REGISTRY_ERRORS:
            return False  # Redis itself is down: the queue timeout still bounds the wait

    async def _send_again(self) -> None:
        """Send the job again, same id: its claim lets only one worker run it, whichever copy it pulls."""
        if self._resends >= MAX_RESENDS:
            await self._give_up()
            raise ServiceUnavailable(
                f"The workers that took this request stopped before starting it, {self._resends + 1} times.",
                code="worker_lost",
            )
        self._resends += 1
        logger.warning("job %s: taken by a worker that stopped before starting it; sending it again", self.id)
        await self._send_job()

    async def _give_up(self, keep: float | None = None) -> None:
        """Scaled: mark this job abandoned, so that no worker starts it and a worker that holds it stops it."""
        registry = get_registry()
        if registry is None or self._deadline is None:
            return
        keep = max(self._deadline - time.time(), 0.0) + CLAIM_MARGIN_SECONDS if keep is None else keep
        try:
            await registry.abandon(self.id, keep)
        except REGISTRY_ERRORS as exc:
            logger.warning("job %s: could not mark it abandoned: %s", self.id, exc)

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
        self._drop_pending()
        await self._settle()

    def _drop_pending(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self._pending = None

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
            self._drop_pending()
            await self._settle()

    def _report(self) -> None:
        """Metrics and the one JSON log line of this request."""
        ended = time.monotonic()
        if self.error is not None:
            outcome = self.error.code or "error"
            if self.metrics is not None:
                self.metrics.failed(outcome, self.usage)
            else:
                # Refused before submission (unknown model, rate limit, no worker): count it all the same,
                # without letting arbitrary model names become label values.
                model = "(unknown)" if outcome == "model_not_found" else self.model
                RequestMetrics(model, self.transport).failed(outcome)
        else:
            outcome = self.finish_reason or "cancelled"
            if self.metrics is not None:
                self.metrics.finished(ended - self.created, outcome, self.usage)
        usage = self.usage or {}
        entry = {
            "event": "generation",
            "request_id": self.request_id,
            "job_id": self.id,
            "model": self.model,
            "transport": self.transport,
            "key": self.principal.name,
            "status": "error" if self.error is not None else "ok",
            "error_code": self.error.code if self.error is not None else None,
            "http_status": self.error.status if self.error is not None else 200,
            "finish_reason": outcome if self.error is None else None,
            "prompt_tokens": usage.get("prompt_tokens", self.prompt_tokens),
            "completion_tokens": usage.get("completion_tokens", 0),
            "queue_ms": _ms(self.admitted_at, self.created),
            "ttft_ms": _ms(self.first_token_at, self.created),
            "duration_ms": round((ended - self.created) * 1000, 2),
            "worker": self.worker,
        }
        if self.completion_text is not None:
            entry["prompt"] = self.request.messages if self.request.kind == "chat" else self.request.prompt
            entry["completion"] = "".join(self.completion_text)
        request_log.info("%s %s %s", self.transport, self.model, entry["status"], extra=entry)

    async def _settle(self) -> None:
        if not self._settled:
            self._report()
        usage = self.usage or {}
        if self.lease is not None:
            lease, self.lease = self.lease, None
            # Exact usage when the worker reported it; else (a lost worker, a timeout) what is known to be spent.
            spent = usage.get("total_tokens", self.prompt_tokens + self.tokens_seen)
            try:
                await lease.release(int(spent))
            except REGISTRY_ERRORS:
                pass  # the window heals by itself; the slot lease expires
        first = not self._settled
        self._settled = True
        if self.principal.key_id is not None and self.reply_channel is not None and first:
            await sync_to_async(record_usage)(
                self.principal.key_id, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
            )

    async def _next_event(self, timeout: float) -> wire.Message | None:
        """The next event on the reply channel, decoded, or ``None`` after ``timeout``.

        A layer whose ``receive`` may be cancelled without losing a message (the embedded one) is awaited
        directly: one wake-up per event. Any other keeps its receive pending across timeouts.
        """
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
        if self._receive_is_cancel_safe:
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    return await self.layer.receive(self.reply_channel)
            except TimeoutError:
                return None
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.layer.receive(self.reply_channel))
        done, _ = await asyncio.wait({self._pending}, timeout=max(timeout, 0))
        if not done:
            return None
        future, self._pending = self._pending, None
        try:
            return future.result()
        except REGISTRY_ERRORS as exc:
            self.finished = True
            raise _layer_down(exc) from None
