"""The ASGI application: HTTP goes to Django, WebSocket to the Channels consumers."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tripod.settings")
# Set up Django (app registry) before importing anything that touches models or settings.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from consumers.websocket import ChatConsumer  # noqa: E402
from tripod.auth import log_open_server  # noqa: E402

websocket_urlpatterns = [
    path("ws/chat/", ChatConsumer.as_asgi()),
]

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
    }
)

log_open_server()
