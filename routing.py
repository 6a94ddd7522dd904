"""The ASGI application: HTTP goes to Django, WebSocket to the Channels consumers.

A browser may open a WebSocket only from this server's own pages or those CORS lets call the API, and HTTP requests
run their synchronous Django code on reused threads (:mod:`tripod.patches.request_threads`).
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tripod.settings")
# Set up Django (app registry) before importing anything that touches models or settings.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import OriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import path  # noqa: E402

from consumers.websocket import ChatConsumer  # noqa: E402
from tripod.accounts.keys import log_open_server  # noqa: E402
from tripod.patches.request_threads import ReusedRequestThreads  # noqa: E402


class BrowserOriginValidator(OriginValidator):
    """Checks ``Origin`` against ALLOWED_HOSTS and the CORS origins when there is one: browsers always send it, so
    pages of other sites are refused unless ``TRIPOD_CORS_ORIGINS`` lets them call the API; API clients (Python
    ``websockets``, curl) send none and are let through to the key check."""

    def valid_origin(self, parsed_origin) -> bool:
        return parsed_origin is None or super().valid_origin(parsed_origin)


def websocket_origins() -> list[str]:
    """The page origins a socket may be opened from: this server's hosts, and the pages CORS lets call the API."""
    if settings.CORS_ALLOW_ALL_ORIGINS:
        return ["*"]
    return [*settings.ALLOWED_HOSTS, *settings.CORS_ALLOWED_ORIGINS]


websocket_urlpatterns = [
    path("ws/chat/", ChatConsumer.as_asgi()),
]

application = ProtocolTypeRouter(
    {
        "http": ReusedRequestThreads(django_asgi_app),
        "websocket": BrowserOriginValidator(URLRouter(websocket_urlpatterns), websocket_origins()),
    }
)

log_open_server()
