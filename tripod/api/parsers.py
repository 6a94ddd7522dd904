"""Request parsing for the API: JSON whatever the Content-Type, with a size cap and clear errors.

OpenAI accepts a JSON body sent without a JSON Content-Type (``curl -d``), so clients written against it expect the
same here. Only text that is valid Unicode gets through, so that a lone surrogate cannot fail later as a 500.
"""

from __future__ import annotations

import json
from typing import Any

from rest_framework.parsers import BaseParser

from tripod.conf import config
from tripod.errors import APIError, InvalidRequest
from tripod.protocol import reject_lone_surrogates


class OpenAIJSONParser(BaseParser):
    """Parses every body as JSON, as OpenAI does: ``curl -d`` without a JSON Content-Type still works."""

    media_type = "*/*"

    def parse(self, stream, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        limit = config().max_body_bytes
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise APIError(f"The request body is larger than {limit} bytes.", code="request_too_large", status=413)
        if not raw.strip():
            raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge integers, deep nesting
            raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
        reject_lone_surrogates(body)
        return body
