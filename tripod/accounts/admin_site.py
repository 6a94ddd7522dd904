"""The Django admin's site, with a login that locks out repeated failures.

Django's admin login has no limit, so a password could be guessed at the speed of the server. Here failures count
per client address and per username, and past ``TRIPOD_ADMIN_LOGIN_ATTEMPTS`` within ``TRIPOD_ADMIN_LOGIN_WINDOW``
the login answers 429 without checking the password; the counts live in Django's cache, shared through Redis when
``REDIS_URL`` is set.
"""

from __future__ import annotations

import hashlib
import math
import time

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.apps import AdminConfig
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse


class TripodAdminConfig(AdminConfig):
    """``django.contrib.admin`` with :class:`TripodAdminSite` as ``admin.site``."""

    default_site = "tripod.accounts.admin_site.TripodAdminSite"


class LoginThrottle:
    """Failed logins per address and per username; each count lives a window from its first failure."""

    def __init__(self, address: str, username: str) -> None:
        self.attempts = settings.TRIPOD_ADMIN_LOGIN_ATTEMPTS
        self.window = settings.TRIPOD_ADMIN_LOGIN_WINDOW
        self.keys = [self._key("address", address), self._key("username", username.casefold())]

    @classmethod
    def for_request(cls, request: HttpRequest) -> LoginThrottle:
        return cls(request.META.get("REMOTE_ADDR", ""), request.POST.get("username", ""))

    @staticmethod
    def _key(kind: str, value: str) -> str:
        # Hashed: a username is any text, and cache keys must be short and printable.
        return f"tripod.admin-login.{kind}.{hashlib.sha256(value.encode()).hexdigest()[:32]}"

    def retry_after(self) -> int | None:
        """Seconds until the lock ends, or None when neither count has reached the limit."""
        values = cache.get_many([*self.keys, *(key + ".since" for key in self.keys)])
        now = time.time()
        waits = [
            values.get(key + ".since", now) + self.window - now
            for key in self.keys
            if values.get(key, 0) >= self.attempts
        ]
        return max(1, math.ceil(max(waits))) if waits else None

    def failed(self) -> None:
        now = time.time()
        for key in self.keys:
            # add is atomic: the first failure starts the window, later ones incr (which keeps the expiry).
            if cache.add(key, 1, timeout=self.window):
                cache.set(key + ".since", now, timeout=self.window)
                continue
            try:
                cache.incr(key)
            except ValueError:  # expired since the add
                cache.add(key, 1, timeout=self.window)

    def succeeded(self) -> None:
        cache.delete(self.keys[1])  # the username's count; the address keeps its own


class TripodAdminSite(admin.AdminSite):
    """Django's admin site; its login view refuses (429) once the throttle is locked."""

    def login(self, request: HttpRequest, extra_context=None):
        if self.attempts_disabled() or request.method != "POST":
            return super().login(request, extra_context)
        throttle = LoginThrottle.for_request(request)
        retry_after = throttle.retry_after()
        if retry_after is not None:
            return too_many_attempts(retry_after)
        response = super().login(request, extra_context)
        form = (getattr(response, "context_data", None) or {}).get("form")
        if form is not None and form.is_bound and not form.is_valid():
            throttle.failed()
        elif request.user.is_authenticated:
            throttle.succeeded()
        return response

    @staticmethod
    def attempts_disabled() -> bool:
        return settings.TRIPOD_ADMIN_LOGIN_ATTEMPTS <= 0


def too_many_attempts(retry_after: int) -> HttpResponse:
    response = HttpResponse(
        "<!doctype html><title>Too many login attempts</title>"
        f"<p>Too many failed login attempts. Try again in {retry_after} seconds.</p>",
        status=429,
    )
    response["Retry-After"] = str(retry_after)
    return response
