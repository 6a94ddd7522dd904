"""Startup checks that stop an unsafe deployment before it serves anything.

The built-in ``DJANGO_SECRET_KEY`` signs the admin's sessions and the resumable-stream URLs, so whoever has read this
repository could forge either. It is allowed, with a warning, only where nobody else can reach the server: with
``DJANGO_DEBUG=1``, or in the embedded default (no ``REDIS_URL``) while daphne listens on loopback only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading

# Kept here, not in settings.py, so that the check compares against the one definition.
INSECURE_SECRET_KEY = "tripod-insecure-development-key-change-me"

logger = logging.getLogger(__name__)

_FIX = (
    "Set DJANGO_SECRET_KEY to a long random value, the same on every web process "
    "(python -c 'import secrets; print(secrets.token_urlsafe(50))'), or set DJANGO_DEBUG=1 for development."
)


class InsecureSecretKey(SystemExit):
    """Ends the process with a message (no traceback): the deployment, not the code, is at fault."""


def check_secret_key() -> None:
    """Refuse the built-in key where others may reach the server; warn where it is allowed."""
    from django.conf import settings

    if settings.SECRET_KEY != INSECURE_SECRET_KEY:
        return
    if settings.DEBUG:
        logger.warning("DJANGO_SECRET_KEY is the built-in development key (allowed: DJANGO_DEBUG=1).")
        return
    if settings.REDIS_URL:
        refuse("REDIS_URL is set (scaled mode)")
    _check_daphne_endpoints()


def refuse(why: str) -> None:
    message = (
        f"Refusing to start: DJANGO_SECRET_KEY is not set, and the built-in development key signs the admin's "
        f"sessions and the resumable-stream URLs, so anyone could forge them; it is allowed only with "
        f"DJANGO_DEBUG=1 or in the embedded mode listening on 127.0.0.1, and {why}. {_FIX}"
    )
    logger.critical(message)
    raise InsecureSecretKey(message)


def loopback_only(endpoints: list[str]) -> bool:
    """Whether every daphne endpoint description (``tcp:port=8000:interface=127.0.0.1``) is a loopback TCP one."""
    return bool(endpoints) and all(_loopback_endpoint(description) for description in endpoints)


def _loopback_endpoint(description: str) -> bool:
    kind, *parts = re.split(r"(?<!\\):", description)
    if kind not in {"tcp", "tcp6"}:
        return False  # a unix socket or an inherited descriptor: whoever holds its other end may be anyone
    options = dict(part.split("=", 1) for part in parts if "=" in part)
    interface = options.get("interface", "").replace("\\:", ":").strip("[]")
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False  # no interface: every address


def _check_daphne_endpoints() -> None:
    """Check the endpoints as daphne starts. Under another ASGI server, whose address this cannot see, only the
    ``DJANGO_DEBUG`` and ``REDIS_URL`` rules apply."""
    try:
        from daphne.server import Server
    except ImportError:  # pragma: no cover - daphne is a requirement
        Server = None
    if Server is None or getattr(Server.run, "tripod_checked", False):
        return
    original = Server.run

    def run(self) -> None:
        # Server.endpoints is what daphne is about to listen on, just before its first socket opens: built from
        # -b/-p/-u/--fd/-e by its CLI, or from the address of manage.py runserver.
        if not loopback_only(list(self.endpoints)):
            try:
                refuse(f"this server listens on {', '.join(self.endpoints) or 'nothing'}")
            except InsecureSecretKey:
                if threading.current_thread() is threading.main_thread():
                    raise
                # runserver serves from a thread under its autoreloader, which outlives an exception there and
                # would sit watching files, serving nothing: end the process, and with it the reloader.
                os._exit(2)
        logger.warning(
            "DJANGO_SECRET_KEY is the built-in development key (allowed: embedded mode on 127.0.0.1 only). %s", _FIX
        )
        original(self)

    run.tripod_checked = True
    Server.run = run
