"""Limits at the edge of HTTP: body size, header size, header and idle timeouts, WebSocket message size.

Daphne hands a request to the application only once Twisted has read all of it, so a limit checked in Django comes
too late. ``LimitedHTTPFactory`` enforces the limits in daphne's connections while a request arrives, and
``RequestBodyLimit`` is the body limit as ASGI middleware, for any server (docs/architecture.md, "Why each patch").
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import ITCPTransport
from twisted.web import http

from tripod.conf import config
from tripod.errors import APIError

# The requirements this patch was written against; tests/test_patch_pins.py holds requirements.txt to them.
WRITTEN_AGAINST = {"daphne": "==4.2.3", "Twisted": "==26.10.0", "autobahn": "==26.11.1"}

logger = logging.getLogger(__name__)
# Daphne's WebSocket message and frame limit: this much over Tripod's, so that Tripod answers first.
DAPHNE_WS_MIN_BYTES = 16 * 1024 * 1024
DAPHNE_WS_FACTOR = 4
# After a refusal, how long the rest of what the client sends is read and dropped before the connection is
# reset: closing a socket with unread data sends a reset, which can destroy the answer before it is read.
LINGER_SECONDS = 2.0
_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


def daphne_websocket_limit(frame_limit: int) -> int:
    """The message and frame size daphne is given for a ``TRIPOD_WS_MAX_FRAME_BYTES`` of ``frame_limit``."""
    return max(DAPHNE_WS_MIN_BYTES, DAPHNE_WS_FACTOR * frame_limit)


@dataclass(frozen=True)
class EdgeLimits:
    """What a connection may send before it is refused."""

    max_body_bytes: int
    header_timeout: float
    idle_timeout: float

    @classmethod
    def from_config(cls) -> EdgeLimits:
        cfg = config()
        return cls(cfg.max_body_bytes, cfg.http_header_timeout, cfg.http_idle_timeout)


def body_too_large(limit: int) -> APIError:
    return APIError(f"The request body is larger than {limit} bytes.", code="request_too_large", status=413)


def _raw_response(status: int, error: APIError) -> bytes:
    body = json.dumps(error.to_dict(), separators=(",", ":")).encode()
    reason = _REASONS.get(status, b"Error")
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    return head % (status, reason, len(body)) + body


class LimitedHTTPChannel(http.HTTPChannel):
    """Twisted's HTTP/1.1 connection with Tripod's limits, enforced while the request is still arriving."""

    def __init__(self, limits: EdgeLimits) -> None:
        super().__init__()
        self.limits = limits
        self._refused = False
        self._head_call = None  # the header timeout of the request being received
        self._head_started = False  # a byte of the next request has arrived
        self._linger_call = None

    # Twisted's state, read here: line_mode (headers), _handlingRequest (a complete request is being
    # answered), _receivedHeaderSize (bytes of this request's head so far), length (None: chunked).

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_head_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and drop
        if self.line_mode and not self._handlingRequest:
            self._head_started = True
            self._start_head_timer()
        super().dataReceived(data)

    def lineReceived(self, line: bytes):
        if self._refused:
            return None
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            return self._refuse_headers()
        return super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes):
        # One line over Twisted's MAX_LENGTH (16 KiB), where Twisted closes the connection without a word.
        return self._refuse_headers()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_head_timer()
        self._head_started = False
        limit = self.limits.max_body_bytes
        if self.length is not None and self.length > limit:
            self._refuse(413, body_too_large(limit))
            return
        super().allHeadersReceived()
        decoder = self._transferDecoder
        if self.length is None and decoder is not None:
            decoder.dataCallback = self._counted(decoder.dataCallback, limit)

    def _counted(self, write, limit: int):
        """A chunked body's writer that refuses the request as soon as the decoded body passes ``limit``."""
        received = 0

        def counted(data: bytes) -> None:
            nonlocal received
            if self._refused:
                return
            received += len(data)
            if received > limit:
                self._refuse(413, body_too_large(limit))
            else:
                write(data)

        return counted

    def _finishRequestBody(self, data: bytes) -> None:
        if not self._refused:
            super()._finishRequestBody(data)

    def timeoutConnection(self) -> None:
        """Twisted's idle timeout: a 408 when a request was under way (its body stopped coming), else a close."""
        if not self._refused and (self._head_started or not self.line_mode) and not self._handlingRequest:
            self._refuse(408, self._timeout_error(f"The client sent nothing for {self.limits.idle_timeout:g} s."))
        elif not self._refused:
            super().timeoutConnection()

    def connectionLost(self, reason) -> None:
        self._cancel_head_timer()
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None
        super().connectionLost(reason)

    def _start_head_timer(self) -> None:
        if self._head_call is None and self.limits.header_timeout > 0:
            self._head_call = self.callLater(self.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_call is not None and self._head_call.active():
            self._head_call.cancel()
        self._head_call = None

    def _head_timed_out(self) -> None:
        self._head_call = None
        if self._head_started:
            seconds = self.limits.header_timeout
            self._refuse(408, self._timeout_error(f"The request's headers took longer than {seconds:g} s."))
        else:  # a connection that never sent a byte: nothing to answer
            self.setTimeout(None)
            self.transport.loseConnection()

    @staticmethod
    def _timeout_error(message: str) -> APIError:
        return APIError(message, code="request_timeout", status=408)

    def _refuse_headers(self) -> None:
        if self._receivedHeaderSize == 0:  # still on the request line
            error = APIError("The request line is longer than 16384 bytes.", code="uri_too_long", status=414)
        else:
            limit = self.totalHeadersSize
            error = APIError(
                f"The request headers are larger than {limit} bytes.",
                code="request_header_fields_too_large",
                status=431,
            )
        self._refuse(error.status, error)

    def _refuse(self, status: int, error: APIError) -> None:
        """Answer ``error`` and end the connection, reading and dropping what the client still sends for a
        moment so that it can read the answer."""
        if self._refused:
            return
        self._refused = True
        self.persistent = False
        self._cancel_head_timer()
        self.setTimeout(None)
        transport = self.transport
        peer = transport.getPeer()
        # Refused before Django saw the request, so no "http" access line: this is its line.
        logger.info(
            "http refused %d %s",
            status,
            error.code,
            extra={
                "event": "http_refused",
                "status": status,
                "error_code": error.code,
                "client": getattr(peer, "host", None),
            },
        )
        transport.write(_raw_response(status, error))
        if ITCPTransport.providedBy(transport):
            transport.loseWriteConnection()
            self._linger_call = self.callLater(LINGER_SECONDS, transport.abortConnection)
        else:
            transport.loseConnection()


def _http_factory_class():
    from daphne.http_protocol import HTTPFactory

    class LimitedHTTPFactory(HTTPFactory):
        """Daphne's HTTP factory whose connections are ``LimitedHTTPChannel``; it also raises the server's
        WebSocket limits above Tripod's (daphne reads them after it builds this factory)."""

        def __init__(self, server) -> None:
            super().__init__(server)
            self.limits = EdgeLimits.from_config()
            # Twisted's own idle timeout: it stops counting once a request is complete, so a long SSE stream is
            # never cut.
            self.timeOut = self.limits.idle_timeout or None
            raise_websocket_limits(server, daphne_websocket_limit(config().ws_max_frame_bytes))

        def protocol(self):
            # Twisted's factory for HTTP/1.1-or-HTTP/2 connections, with our HTTP/1.1 channel inside.
            return http._GenericHTTPChannelProtocol(LimitedHTTPChannel(self.limits))

    return LimitedHTTPFactory


def raise_websocket_limits(server, size: int) -> None:
    """At least ``size`` for daphne's WebSocket message and frame limits; 0 (no limit) stays 0."""
    for name in ("websocket_max_message_size", "websocket_max_frame_size"):
        current = getattr(server, name, None)
        if current:
            setattr(server, name, max(current, size))
    ws_factory = getattr(server, "ws_factory", None)
    if ws_factory is not None:  # a daphne that set its options before building the HTTP factory
        ws_factory.setProtocolOptions(
            maxMessagePayloadSize=server.websocket_max_message_size,
            maxFramePayloadSize=server.websocket_max_frame_size,
        )


def install() -> None:
    """Have the daphne of this process (``daphne``, ``manage.py runserver``) build ``LimitedHTTPFactory``.

    Daphne builds its factory when it starts serving, after it has imported the application, so this works
    whatever command line started it. Without daphne (another ASGI server) only ``RequestBodyLimit`` applies.
    """
    server_module = sys.modules.get("daphne.server")
    if server_module is not None:
        server_module.HTTPFactory = _http_factory_class()


class RequestBodyLimit:
    """ASGI middleware: a 413 from ``Content-Length`` before the body is read; a body without a
    ``Content-Length`` read here, up to the limit, and handed on with one."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = config().max_body_bytes
        headers = scope.get("headers") or []
        declared = next((value for name, value in headers if name == b"content-length"), None)
        if declared is not None:
            if declared.strip().isdigit() and int(declared) > limit:
                return await _send_error(send, body_too_large(limit))
            return await self.app(scope, receive, send)
        messages: list[dict[str, Any]] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: the application sees it
            size += len(message.get("body", b""))
            if size > limit:
                return await _send_error(send, body_too_large(limit))
            if not message.get("more_body", False):
                break
        if size:
            body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
            others = [m for m in messages if m["type"] != "http.request"]
            messages = [{"type": "http.request", "body": body, "more_body": False}, *others]
            # The body is decoded now: it has a length, and no transfer coding any more. Django and DRF read a body
            # only as far as Content-Length says (without one, none).
            kept = [(n, v) for n, v in headers if n != b"transfer-encoding"]
            scope = {**scope, "headers": [*kept, (b"content-length", str(size).encode())]}

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.to_dict(), separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


__all__ = ["RequestBodyLimit", "daphne_websocket_limit", "install"]
