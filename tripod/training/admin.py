"""Training runs in the Django admin: read-only, since ``run_train`` writes them.

An edited row would disagree with the run it records, so the admin lists, filters and searches them only.
"""

from __future__ import annotations

from django.contrib import admin

from tripod.training.models import TrainingRun


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "model_name",
        "finetuning_type",
        "status",
        "started_at",
        "took",
        "steps",
        "final_loss",
        "output_dir",
    )
    list_filter = ("status",)
    search_fields = ("output_dir", "error")
    date_hierarchy = "started_at"

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="type")
    def finetuning_type(self, run: TrainingRun) -> str:
        return str(run.config.get("finetuning_type", ""))

    @admin.display(description="steps")
    def steps(self, run: TrainingRun) -> str:
        return f"{run.global_step}/{run.max_steps}"

    @admin.display(description="duration")
    def took(self, run: TrainingRun) -> str:
        return f"{run.duration.total_seconds():.0f} s"
