"""Errors as values users can read: OpenAI's ``{"error": {message, type, param, code}}`` shape.

Plain Python on purpose: engines and workers raise these without Django loaded. Turning them (and DRF's and Django's
own errors) into HTTP responses is ``tripod/api/errors.py``'s job.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error a client caused or must be told about, with the HTTP status it maps to."""

    status = 400
    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(APIError):
    """400: the request body is not a valid request."""


class ModelNotFound(APIError):
    status = 404

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist or is not served here.",
            param="model",
            code="model_not_found",
        )


class ContextLengthExceeded(APIError):
    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class ServiceUnavailable(APIError):
    status = 503
    type = "server_error"


def channel_layer_unavailable(exc: BaseException) -> ServiceUnavailable:
    """The answer when Redis (the channel layer, the registry) fails under a request."""
    return ServiceUnavailable(f"The channel layer (Redis) is unavailable: {exc}", code="channel_layer_unavailable")


class EngineFailure(APIError):
    status = 500
    type = "server_error"
