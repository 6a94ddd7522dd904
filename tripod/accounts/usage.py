"""Usage accounting per key and day: one database write per finished request, never one per token.

A stream would otherwise write the database for every token it sends. The counts are incremented in SQL (``F()``), so
concurrent web processes never lose each other's requests.
"""

from __future__ import annotations

import datetime as dt
import logging

from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from tripod.models import UsageDay

logger = logging.getLogger(__name__)


def record(key_id: int, prompt_tokens: int, completion_tokens: int) -> None:
    """Add one request and its tokens to today's row for ``key_id``."""
    today = timezone.now().date()
    increments = {
        "requests": F("requests") + 1,
        "prompt_tokens": F("prompt_tokens") + prompt_tokens,
        "completion_tokens": F("completion_tokens") + completion_tokens,
    }
    try:
        if UsageDay.objects.filter(key_id=key_id, day=today).update(**increments):
            return
        try:
            with transaction.atomic():
                UsageDay.objects.create(
                    key_id=key_id,
                    day=today,
                    requests=1,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                )
        except IntegrityError:  # another process created today's row first
            UsageDay.objects.filter(key_id=key_id, day=today).update(**increments)
    except DatabaseError:
        # Accounting must not fail a request that was served; the log says what was lost.
        logger.exception("could not record usage for key %s", key_id)


def for_key(key_id: int, days: int = 30) -> list[dict]:
    since = timezone.now().date() - dt.timedelta(days=days - 1)
    rows = UsageDay.objects.filter(key_id=key_id, day__gte=since).order_by("day")
    return [
        {
            "date": row.day.isoformat(),
            "requests": row.requests,
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "total_tokens": row.prompt_tokens + row.completion_tokens,
        }
        for row in rows
    ]
