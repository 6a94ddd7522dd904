"""Structured logs: one JSON object per line, each carrying the request id it belongs to.

An incoming ``X-Request-ID`` is kept (or one is made), echoed on the response, passed to the worker with
the job, and attached to every log line written while serving that request, in the web process and in
the worker alike.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("tripod_request_id", default=None)
HEADER = "X-Request-ID"
# One line per HTTP request (daphne's own access log is switched off: it is not JSON).
access_log = logging.getLogger("tripod.access")
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Secrets a line may carry: a query parameter named like a credential (a key sent as ``?api_key=``, a stream
# URL's ``?token=``), a bearer credential (header or ``bearer.<key>`` subprotocol), a stored key anywhere.
_SECRET_PARAM = re.compile(
    r"(?i)((?:^|[?&;\s'\"])(?:api[_-]?key|key|token|access[_-]?token|auth|password|secret)=)[^&;\s'\"#<>]*"
)
_BEARER = re.compile(r"(?i)(\bbearer[ .:=]+)[^\s,;'\"<>]+")
_STORED_KEY = re.compile(r"\btpd_[A-Za-z0-9_-]{4,}")
REDACTED = "[redacted]"
# LogRecord attributes that are not user-supplied ``extra`` fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


def clean_request_id(value: str | None) -> str:
    """The caller's request id if it is safe to log and echo, else a new one."""
    if value and _VALID.match(value):
        return value
    return uuid.uuid4().hex


def redact(text: str) -> str:
    """``text`` with every credential it carries replaced by ``[redacted]``."""
    if not text:
        return text
    text = _SECRET_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return _STORED_KEY.sub("tpd_" + REDACTED, text)


def _safe_extra(value: object) -> object:
    """``value`` with every secret redacted, keeping JSON structure (a logged prompt stays a list of messages)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {redact(str(k)): _safe_extra(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_safe_extra(v) for v in value]
    path = getattr(value, "path", None)
    if isinstance(path, str) and hasattr(value, "method"):
        # An HttpRequest (django.request passes one): its repr has the full query string.
        return f"<{type(value).__name__}: {value.method} {redact(path)!r}>"
    return redact(value if isinstance(value, str) else str(value))


class RequestIDFilter(logging.Filter):
    """Stamps each record with the request id of the context it was logged in, and takes every secret out of
    it (message, arguments, ``extra`` fields, traceback), whichever logger wrote it (Django's ``django.request``
    puts the request, full query string and all, in ``extra``; daphne's runserver logs the whole URI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = REQUEST_ID.get()
        if getattr(record, "_tripod_redacted", False):
            return True
        record._tripod_redacted = True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the formatter's to report
            message = None
        if message is not None:
            record.msg, record.args = redact(message), None
        for name, value in list(vars(record).items()):
            if name not in _STANDARD and not name.startswith("_") and name != "request_id":
                setattr(record, name, _safe_extra(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id", ...extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_text or record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RequestIDMiddleware:
    """Keeps or makes the request id, exposes it as ``request.request_id`` and echoes it on the response."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def _begin(self, request) -> contextvars.Token:
        request.request_id = clean_request_id(request.headers.get(HEADER))
        request.started_at = time.monotonic()
        return REQUEST_ID.set(request.request_id)

    @staticmethod
    def _end(request, response):
        response[HEADER] = request.request_id
        access_log.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status_code,
            extra={
                "event": "http",
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": round((time.monotonic() - request.started_at) * 1000, 2),
                "streaming": response.streaming,
            },
        )
        return response

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        token = self._begin(request)
        try:
            return self._end(request, self.get_response(request))
        finally:
            REQUEST_ID.reset(token)

    async def __acall__(self, request):
        token = self._begin(request)
        try:
            return self._end(request, await self.get_response(request))
        finally:
            REQUEST_ID.reset(token)
