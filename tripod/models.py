"""What Tripod keeps in the database: API keys (hashed) and per-key daily usage.

Usage is one row per key and day, so the table grows with days, not with requests.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class APIKey(models.Model):
    """A client's key. Only a SHA-256 hash is stored; the key itself is shown once, at creation."""

    name = models.CharField(max_length=100, unique=True)
    prefix = models.CharField(max_length=16, help_text="The key's first characters, to recognise it.")
    hashed_key = models.CharField(max_length=64, unique=True, editable=False)
    rpm = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute (empty: no limit).")
    tpm = models.PositiveIntegerField(
        null=True, blank=True, help_text="Prompt + completion tokens per minute (empty: no limit)."
    )
    max_streams = models.PositiveIntegerField(
        null=True, blank=True, help_text="Generations running at once (empty: no limit)."
    )
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class UsageDay(models.Model):
    """Requests and tokens of one key on one day (UTC), incremented once per finished request."""

    key = models.ForeignKey(APIKey, on_delete=models.CASCADE, related_name="usage")
    day = models.DateField()
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        verbose_name = "daily usage"
        verbose_name_plural = "daily usage"
        ordering = ["-day", "key__name"]
        constraints = [models.UniqueConstraint(fields=["key", "day"], name="one_usage_row_per_key_and_day")]

    def __str__(self) -> str:
        return f"{self.key.name} {self.day}"
