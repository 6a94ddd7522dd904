"""Django's own middleware, run on the event loop where it does no I/O.

Under ASGI, Django hands every hook of a ``MiddlewareMixin`` middleware to a thread and back, and on a busy server
each hand-over waits for the GIL. These subclasses run the hooks on the loop; only saving a changed session still
goes to a thread (docs/architecture.md, "Why each patch").
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.middleware import clickjacking, common, csrf, security

# The requirements this patch was written against; tests/test_patch_pins.py holds requirements.txt to them.
WRITTEN_AGAINST = {"Django": ">=5.2,<5.3"}


# Each middleware below stays a subclass of Django's own, so that Django's checks (the admin's E408-E410) still
# find what they look for.
class OnTheLoop:
    """For a ``MiddlewareMixin`` whose ``process_request`` and ``process_response`` do no I/O."""

    async def __acall__(self, request):
        response = self.process_request(request) if hasattr(self, "process_request") else None
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class SecurityMiddleware(OnTheLoop, security.SecurityMiddleware):
    """Django's: the HTTPS redirect and the security headers (settings only)."""


class CommonMiddleware(OnTheLoop, common.CommonMiddleware):
    """Django's: user-agent refusals and slash redirects (the URL resolver only)."""


class CsrfViewMiddleware(OnTheLoop, csrf.CsrfViewMiddleware):
    """Django's, with the token in a cookie (``CSRF_USE_SESSIONS`` is off), so no hook reads the database."""

    async def process_view(self, request, callback, callback_args, callback_kwargs):
        # Django hands a synchronous process_view to a thread for every request under ASGI.
        return super().process_view(request, callback, callback_args, callback_kwargs)


class AuthenticationMiddleware(OnTheLoop, auth.AuthenticationMiddleware):
    """Django's: ``request.user`` stays lazy; the user is loaded only where a view asks for it."""


class MessageMiddleware(OnTheLoop, messages.MessageMiddleware):
    """Django's: messages live in a cookie or in the session, which the session middleware saves."""


class SessionMiddleware(sessions.SessionMiddleware):
    """Django's: the session loads lazily; saving a changed one writes the database, so that runs on a thread."""

    async def __acall__(self, request):
        self.process_request(request)
        response = await self.get_response(request)
        if getattr(request.session, "modified", False) or settings.SESSION_SAVE_EVERY_REQUEST:
            return await sync_to_async(self.process_response, thread_sensitive=True)(request, response)
        return self.process_response(request, response)


class XFrameOptionsMiddleware(OnTheLoop, clickjacking.XFrameOptionsMiddleware):
    """Django's: ``X-Frame-Options: DENY`` on every response (settings only), so the admin cannot be framed."""
