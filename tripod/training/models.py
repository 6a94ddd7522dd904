"""One row per training run: what it was asked to do, how it went, and where its model is.

The row is written when training starts and updated as it logs, so a run that crashed still shows how far it got.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class TrainingRun(models.Model):
    """A ``run_train`` invocation; written when training starts, updated as it logs and when it ends."""

    class Status(models.TextChoices):
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    config = models.JSONField(help_text="The validated config, every key with its value.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING, db_index=True)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    global_step = models.PositiveIntegerField(default=0)
    max_steps = models.PositiveIntegerField(default=0)
    final_loss = models.FloatField(null=True, blank=True, help_text="The last logged training loss.")
    output_dir = models.CharField(max_length=1024)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.model_name} ({self.config.get('finetuning_type', '?')}) → {self.output_dir}"

    @property
    def model_name(self) -> str:
        return str(self.config.get("model_name_or_path", ""))

    @property
    def duration(self):
        return (self.finished_at or timezone.now()) - self.started_at

    def progress(self, global_step: int, max_steps: int, loss: float | None) -> None:
        self.global_step, self.max_steps = global_step, max_steps
        if loss is not None:
            self.final_loss = loss
        self.save(update_fields=["global_step", "max_steps", "final_loss"])

    def finish(self, status: str, error: str = "") -> None:
        self.status, self.error, self.finished_at = status, error, timezone.now()
        self.save(update_fields=["status", "error", "finished_at"])
