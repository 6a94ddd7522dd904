"""The built-in chat page at ``/`` and its three assets under ``/ui/``.

Plain Django views, outside the API: the page and its assets hold no data, so they need no key (the page asks for one
when ``/v1/models`` answers 401). Daphne serves no static files and WhiteNoise has no ASGI support, so a small view
serves the names in :data:`ASSETS` and nothing else, each with an ETag so that browsers revalidate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotModified
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe

STATIC = Path(__file__).resolve().parent / "static" / "tripod"

# The whole set of files /ui/<name> can answer with, and their types.
ASSETS = {
    "chat.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    etag: str
    content_type: str

    @property
    def version(self) -> str:
        return self.etag.strip('"')


@lru_cache(maxsize=len(ASSETS))
def _load(name: str, mtime_ns: int) -> Asset:
    body = (STATIC / name).read_bytes()
    return Asset(body, '"' + hashlib.sha256(body).hexdigest()[:16] + '"', ASSETS[name])


def asset(name: str) -> Asset:
    """The current contents of a whitelisted asset; re-read when the file changes (cheap: one ``stat``)."""
    path = STATIC / name
    return _load(name, path.stat().st_mtime_ns)


def content_security_policy(request: HttpRequest) -> str:
    """No inline script or style, nothing from other origins; WebSockets only to this same host.

    ``'self'`` covers ``ws:`` and ``wss:`` in CSP 3 browsers; the explicit entries are for older ones.
    ``get_host()`` has been validated against ALLOWED_HOSTS and its characters are a host's only.
    """
    host = request.get_host()
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self' ws://{host} wss://{host}",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


# Read-only views: a POST gets 405 from ``require_safe`` rather than the CSRF middleware's HTML 403.
@csrf_exempt
@require_safe
def chat_page(request: HttpRequest) -> HttpResponse:
    """``GET /``: the chat page. Its assets are linked with their hashes so that a new version is fetched."""
    versions = {name.replace(".", "_"): asset(name).version for name in ASSETS}
    response = render(request, "tripod/chat.html", {"versions": versions})
    response["Content-Security-Policy"] = content_security_policy(request)
    response["Cache-Control"] = "no-cache"
    response["Referrer-Policy"] = "no-referrer"
    response["X-Frame-Options"] = "DENY"
    return response


@csrf_exempt
@require_safe
def ui_asset(request: HttpRequest, name: str) -> HttpResponse:
    """``GET /ui/<name>``: one of :data:`ASSETS`, revalidated by ETag on every use."""
    if name not in ASSETS:
        raise Http404("No such asset.")
    current = asset(name)
    if current.etag in {tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")}:
        response = HttpResponseNotModified()
    else:
        response = HttpResponse(current.body, content_type=current.content_type)
    response["ETag"] = current.etag
    response["Cache-Control"] = "no-cache"
    return response
