"""Errors as values users can read: OpenAI's ``{"error": {message, type, param, code}}`` shape."""

from __future__ import annotations

import logging
from typing import Any

from django.http import JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

logger = logging.getLogger(__name__)


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


def error_response(error: APIError) -> JsonResponse:
    return JsonResponse(error.to_dict(), status=error.status)


_DRF_CODES = {
    drf_exceptions.ParseError: ("invalid_request_error", "invalid_json"),
    drf_exceptions.MethodNotAllowed: ("invalid_request_error", "method_not_allowed"),
    drf_exceptions.NotFound: ("invalid_request_error", "not_found"),
    drf_exceptions.UnsupportedMediaType: ("invalid_request_error", "unsupported_media_type"),
    drf_exceptions.NotAcceptable: ("invalid_request_error", "not_acceptable"),
    drf_exceptions.NotAuthenticated: ("invalid_request_error", "invalid_api_key"),
    drf_exceptions.AuthenticationFailed: ("invalid_request_error", "invalid_api_key"),
    drf_exceptions.PermissionDenied: ("permission_error", "permission_denied"),
    drf_exceptions.Throttled: ("rate_limit_error", "rate_limit_exceeded"),
}


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER: every error a view raises leaves in OpenAI's shape."""
    if isinstance(exc, APIError):
        return Response(exc.to_dict(), status=exc.status, headers=getattr(exc, "headers", None))
    if isinstance(exc, drf_exceptions.APIException):
        err_type, code = next(
            (v for k, v in _DRF_CODES.items() if isinstance(exc, k)),
            ("invalid_request_error", exc.default_code),
        )
        detail = exc.detail
        message = detail if isinstance(detail, str) else str(detail)
        headers = {}
        if isinstance(exc, drf_exceptions.Throttled) and exc.wait is not None:
            headers["Retry-After"] = str(int(exc.wait) + 1)
        body = APIError(message, code=code, type=err_type, status=exc.status_code).to_dict()
        return Response(body, status=exc.status_code, headers=headers)
    logger.exception("unhandled error in %s", context.get("view"))
    error = APIError("The server had an error while processing your request.", status=500, type="server_error")
    return Response(error.to_dict(), status=500)


def not_found(request, exception=None) -> JsonResponse:
    """handler404: unknown paths answer in the API's error shape, not an HTML page."""
    return error_response(APIError(f"Unknown path: {request.path}", code="not_found", status=404))


def server_error(request) -> JsonResponse:
    """handler500: never a traceback page."""
    return error_response(
        APIError("The server had an error while processing your request.", status=500, type="server_error")
    )


def bad_request(request, exception=None) -> JsonResponse:
    return error_response(APIError("Bad request.", code="bad_request"))
