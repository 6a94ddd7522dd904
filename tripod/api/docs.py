"""Swagger UI's files for ``/docs``, served by this server so that the page works offline.

drf-spectacular's page loads Swagger UI from a CDN by default: blank without a network. The files ship in
``drf-spectacular-sidecar``; daphne serves no static files, so a small view answers ``/docs/ui/<name>`` for
the names in :data:`FILES` only (no part of the URL reaches the filesystem), with an ETag to revalidate.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import drf_spectacular_sidecar
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotModified
from django.views.decorators.http import require_safe

SWAGGER_UI = Path(drf_spectacular_sidecar.__file__).resolve().parent / "static" / "drf_spectacular_sidecar"
SWAGGER_UI = SWAGGER_UI / "swagger-ui-dist"

# What the page links (SPECTACULAR_SETTINGS' SWAGGER_UI_DIST and SWAGGER_UI_FAVICON_HREF point here).
FILES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui-standalone-preset.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "oauth2-redirect.html": "text/html; charset=utf-8",
    "oauth2-redirect.js": "text/javascript; charset=utf-8",
}


@lru_cache(maxsize=len(FILES))
def _load(name: str) -> tuple[bytes, str]:
    body = (SWAGGER_UI / name).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


@require_safe
def swagger_ui_file(request: HttpRequest, name: str) -> HttpResponse:
    """One of Swagger UI's files; the package's files change only with its version, so they are read once."""
    if name not in FILES:
        raise Http404(name)
    body, etag = _load(name)
    if request.headers.get("If-None-Match") == etag:
        response = HttpResponseNotModified()
    else:
        response = HttpResponse(body, content_type=FILES[name])
    response["ETag"] = etag
    response["Cache-Control"] = "no-cache"
    return response
