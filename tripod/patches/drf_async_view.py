"""DRF's request cycle with ``async def`` handlers, so that a generation request stays on the event loop.

A synchronous DRF view that submits a job hands the GIL between its thread and the loop four times per request.
:class:`AsyncAPIView` runs every part of DRF on the loop instead and sends only what may block to a thread
(docs/architecture.md, "Why each patch").
"""

from __future__ import annotations

import inspect

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.http import HttpResponse
from django.template.response import SimpleTemplateResponse
from django.utils.functional import classproperty
from rest_framework.request import Request
from rest_framework.views import APIView

# The requirements this patch was written against; tests/test_patch_pins.py holds requirements.txt to them.
WRITTEN_AGAINST = {"djangorestframework": "==3.18.3", "channels": "==4.3.2"}


class AsyncAPIView(APIView):
    """An ``APIView`` whose handlers are ``async def``; Django awaits its ``dispatch`` on the event loop.

    A synchronous handler (DRF's ``options``) runs on the loop too, so it must not block.
    """

    @classproperty
    def view_is_async(cls) -> bool:
        # Django asks whether the handlers are coroutine functions, but drf-spectacular's schema decorators
        # wrap inherited ones in plain functions; dispatch() is the coroutine here, whatever they are.
        return True

    async def dispatch(self, request, *args, **kwargs):  # DRF's dispatch(), awaiting what may wait
        self.args = args
        self.kwargs = kwargs
        request = self.initialize_request(request, *args, **kwargs)
        self.request = request
        self.headers = self.default_response_headers
        try:
            await self._authenticate(request)
            if self.get_throttles():
                await sync_to_async(self.initial, thread_sensitive=False)(request, *args, **kwargs)
            else:
                self.initial(request, *args, **kwargs)  # the caller is known: nothing left here blocks
            method = request.method.lower()
            handler = self.http_method_not_allowed
            if method in self.http_method_names:
                handler = getattr(self, method, self.http_method_not_allowed)
            response = handler(request, *args, **kwargs)
            if inspect.isawaitable(response):  # DRF's own options() is synchronous
                response = await response
        except Exception as exc:  # noqa: BLE001 - DRF's contract: every error becomes a response
            response = self.handle_exception(exc)
        self.response = self.finalize_response(request, response, *args, **kwargs)
        return _rendered(self.response)

    async def _authenticate(self, request: Request) -> None:
        """DRF's ``Request._authenticate``, awaiting ``authenticate_async`` where an authenticator has it."""
        for authenticator in request.authenticators:
            authenticate = getattr(authenticator, "authenticate_async", None)
            if authenticate is None:
                authenticate = database_sync_to_async(authenticator.authenticate, thread_sensitive=False)
            try:
                user_auth = await authenticate(request)
            except Exception:
                request._not_authenticated()
                raise
            if user_auth is not None:
                request._authenticator = authenticator
                request.user, request.auth = user_auth
                return
        request._not_authenticated()


def _rendered(response):
    """A DRF ``Response`` rendered here: Django would render it in a thread of its own."""
    if not isinstance(response, SimpleTemplateResponse):
        return response  # a streaming response, or an HttpResponse
    response.render()
    plain = HttpResponse(response.content, status=response.status_code)
    for header, value in response.items():
        plain[header] = value
    return plain
