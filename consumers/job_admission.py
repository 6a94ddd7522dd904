"""Admitting a job: the checks before it is sent (its model, its token cap, its key's rate limits), the job a
worker receives, and the worker's ``Started`` that admits it.

``GenerationJob.start()`` runs ``admit``; the queue (``job_queue``) carries the job to a worker. Once the worker
has counted the prompt, the lease holds exactly what the job may use.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from consumers.job_queue import QueuedJob, layer_down
from consumers.served_models import resolve_model
from tripod import job_protocol as wire
from tripod.accounts import ratelimit
from tripod.conf import config
from tripod.errors import EngineFailure, InvalidRequest, ServiceUnavailable
from tripod.observability.metrics import RequestMetrics
from tripod.protocol import SamplingParams
from tripod.registry import REGISTRY_ERRORS, get_registry

if TYPE_CHECKING:
    from consumers.jobs import GenerationJob

# A streamed delta held back to gather TRIPOD_STREAM_INTERVAL tokens goes out once this much older than the last.
STREAM_HOLD_SECONDS = 0.5
# The longest a worker holds back the text of a reply that is not streamed.
UNSTREAMED_HOLD_SECONDS = 1.0


async def admit(job: GenerationJob) -> None:
    """Check the request, take its lease, send it and wait until a worker has started it; errors raise ``APIError``."""
    cfg = config()
    job.model = await resolve_model(job.request.model)
    _check_cap(job.request.params, cfg.max_tokens_cap)
    try:
        job.lease = await ratelimit.admit(job.principal, job.request, cfg.max_tokens_cap)
    except REGISTRY_ERRORS as exc:
        raise layer_down(exc) from None
    if cfg.inline_worker:
        from asgi_worker.inline import ensure_inline_worker

        ensure_inline_worker()
    try:
        job.queued = QueuedJob(job.layer, await _wire_job(job, cfg), job.next_event)
        job.metrics = RequestMetrics(job.model, job.transport)
        job.metrics.waiting()
        await job.queued.send()
        started = _accept(job, await job.queued.wait(cfg), cfg)
        await _reserve_exactly(job, started.max_tokens or job.request.params.max_tokens)
    except REGISTRY_ERRORS as exc:
        job.finished = True
        raise layer_down(exc) from None


def _check_cap(params: SamplingParams, cap: int) -> None:
    """A ``max_tokens`` above the server's cap is refused; an open-ended request is capped by the worker."""
    if cap and params.max_tokens is not None and params.max_tokens > cap:
        raise InvalidRequest(
            f"'max_tokens' is {params.max_tokens}; this server allows at most {cap}.",
            param="max_tokens",
            code="max_tokens_too_large",
        )


async def _wire_job(job: GenerationJob, cfg) -> wire.Job:
    """The job as its worker receives it, with the reply channel it answers on."""
    reply_channel = await job.events.open()
    chat = job.request.kind == "chat"
    registry = get_registry()
    return wire.Job(
        id=job.id,
        request_id=job.request_id,
        reply_channel=reply_channel,
        model=job.model,
        params=job.request.params,
        messages=job.request.messages if chat else None,
        prompt=None if chat else job.request.prompt,
        max_prompt_tokens=cfg.max_prompt_tokens or None,
        max_tokens_cap=cfg.max_tokens_cap or None,
        deadline=time.time() + cfg.queue_timeout,
        # Scaled: name this web process, so that its workers stop the job if the process dies.
        web=await registry.ensure_web_heartbeat(cfg.heartbeat_interval) if registry is not None else None,
        **_coalescing(job.transport, cfg),
    )


def _coalescing(transport: str, cfg) -> dict[str, Any]:
    """How the worker may merge deltas (``TokenStream.deltas_async``): tokens per delta after the first, and the
    longest a delta may be held back for that. A reply that is not streamed needs only the first delta (its time
    to first token) and a sign of life well within the event timeout; its text can come at the end."""
    if transport == "rest":
        return {"stream_interval": 0, "stream_hold": min(UNSTREAMED_HOLD_SECONDS, cfg.event_timeout / 4)}
    return {"stream_interval": cfg.stream_interval, "stream_hold": min(STREAM_HOLD_SECONDS, cfg.event_timeout / 4)}


def _accept(job: GenerationJob, event: wire.Message | None, cfg) -> wire.Started:
    """The worker's first event: ``Started`` admits the job (from now on cancels go to its worker), else it failed."""
    if event is None:
        raise ServiceUnavailable(
            f"No worker for model '{job.model}' accepted the request within {cfg.queue_timeout:g} s.",
            code="no_worker_available",
        )
    if isinstance(event, wire.Error):
        job.finished = True
        raise event.to_error()
    if not isinstance(event, wire.Started):
        raise EngineFailure(f"Unexpected event from the worker: {event.TYPE}", code="protocol_error")
    job.worker = event.worker
    job.control_channel = event.control
    job.prompt_tokens = int(event.prompt_tokens)
    job.admitted_at = time.monotonic()
    job.metrics.admitted(job.admitted_at - job.created)
    return event


async def _reserve_exactly(job: GenerationJob, max_tokens: int | None) -> None:
    """Now that the worker has counted the prompt, hold exactly what the job may use (prompt + its token
    budget) instead of the web side's bound; when that is more and does not fit, the job is refused (429)."""
    if job.lease is None or not max_tokens:
        return
    try:
        await job.lease.resize(job.prompt_tokens + job.request.params.n * int(max_tokens))
    except REGISTRY_ERRORS:
        pass  # keep the bound taken at admission
