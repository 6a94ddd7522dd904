"""Settling a generation once it ends: its metrics, its one access-log line, its lease and its usage record.

Exact usage when the worker reported it; else (a lost worker, a timeout) what the client is known to have spent.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async

from tripod.accounts.usage import record as record_usage
from tripod.observability.metrics import RequestMetrics
from tripod.registry import REGISTRY_ERRORS

if TYPE_CHECKING:
    from consumers.jobs import GenerationJob

# One line per generation request: the access log of the API.
request_log = logging.getLogger("tripod.requests")


def _ms(later: float | None, earlier: float) -> float | None:
    return None if later is None else round((later - earlier) * 1000, 2)


async def settle(job: GenerationJob, *, first: bool) -> None:
    """Release the job's lease; the first time, also report it and record its usage against its key."""
    if first:
        report(job)
    usage = job.usage or {}
    if job.lease is not None:
        lease, job.lease = job.lease, None
        spent = usage.get("total_tokens", job.prompt_tokens + job.tokens_seen)
        try:
            await lease.release(int(spent))
        except REGISTRY_ERRORS:
            pass  # the window heals by itself; the slot lease expires
    if first and job.principal.key_id is not None and job.reply_channel is not None:
        await sync_to_async(record_usage)(
            job.principal.key_id, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        )


def report(job: GenerationJob) -> None:
    """Metrics and the one JSON log line of this request."""
    ended = time.monotonic()
    error = job.error
    if error is not None:
        outcome = error.code or "error"
        if job.metrics is not None:
            job.metrics.failed(outcome, job.usage)
        else:
            # Refused before submission (unknown model, rate limit, no worker): count it all the same,
            # without letting arbitrary model names become label values.
            model = "(unknown)" if outcome == "model_not_found" else job.model
            RequestMetrics(model, job.transport).failed(outcome)
    else:
        outcome = job.finish_reason or "cancelled"
        if job.metrics is not None:
            job.metrics.finished(ended - job.created, outcome, job.usage)
    usage = job.usage or {}
    entry = {
        "event": "generation",
        "request_id": job.request_id,
        "job_id": job.id,
        "model": job.model,
        "transport": job.transport,
        "key": job.principal.name,
        "status": "error" if error is not None else "ok",
        "error_code": error.code if error is not None else None,
        "http_status": error.status if error is not None else 200,
        "finish_reason": outcome if error is None else None,
        "prompt_tokens": usage.get("prompt_tokens", job.prompt_tokens),
        "completion_tokens": usage.get("completion_tokens", 0),
        "queue_ms": _ms(job.admitted_at, job.created),
        "ttft_ms": _ms(job.first_token_at, job.created),
        "duration_ms": round((ended - job.created) * 1000, 2),
        "worker": job.worker,
    }
    if job.completion_text is not None:
        entry["prompt"] = job.request.messages if job.request.kind == "chat" else job.request.prompt
        entry["completion"] = "".join(job.completion_text)
    request_log.info("%s %s %s", job.transport, job.model, entry["status"], extra=entry)
