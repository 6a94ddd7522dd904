"""Django admin for API keys and usage. A key created here is shown once, in the confirmation message."""

from __future__ import annotations

from django.contrib import admin, messages
from django.utils import timezone

from tripod.accounts.keys import KEY_PREFIX, forget_cached_keys, generate_key, hash_key
from tripod.models import APIKey, UsageDay


@admin.register(APIKey)
class APIKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "rpm", "tpm", "max_streams", "created_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix")
    readonly_fields = ("prefix", "created_at")
    actions = ["revoke_keys"]

    def save_model(self, request, obj: APIKey, form, change: bool) -> None:
        if not change:
            key = generate_key()
            obj.hashed_key = hash_key(key)
            obj.prefix = key[: len(KEY_PREFIX) + 6]
            messages.warning(request, f"The new key for '{obj.name}' is {key} : copy it now, it is not stored.")
        super().save_model(request, obj, form, change)
        forget_cached_keys()

    @admin.action(description="Revoke the selected keys")
    def revoke_keys(self, request, queryset) -> None:
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        forget_cached_keys()
        self.message_user(request, f"Revoked {count} key(s).")


@admin.register(UsageDay)
class UsageDayAdmin(admin.ModelAdmin):
    list_display = ("day", "key", "requests", "prompt_tokens", "completion_tokens")
    list_filter = ("day", "key")
    date_hierarchy = "day"
