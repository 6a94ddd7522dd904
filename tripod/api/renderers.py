"""Response rendering for the API: JSON that is always valid UTF-8.

An error message may quote a client's invalid text, and rendering it must not fail with a 500 of its own.
"""

from __future__ import annotations

from typing import Any

from rest_framework.renderers import JSONRenderer


class OpenAIJSONRenderer(JSONRenderer):
    """DRF's JSON renderer (UTF-8, unescaped), except that a string UTF-8 cannot hold, a lone surrogate, goes out
    as its ``\\ud800`` escape: an error that quotes a client's bad text must not become a 500 of its own."""

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: dict | None = None) -> bytes:
        try:
            return super().render(data, accepted_media_type, renderer_context)
        except UnicodeEncodeError:
            return _EscapedJSONRenderer().render(data, accepted_media_type, renderer_context)


class _EscapedJSONRenderer(JSONRenderer):
    ensure_ascii = True
