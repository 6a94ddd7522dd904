"""The edge of the server, with real sockets against a real daphne started as the Procfile starts it: body size
refused from ``Content-Length`` before the body, chunked bodies, header size, header and idle timeouts, and
WebSocket frames over ``TRIPOD_WS_MAX_FRAME_BYTES`` at its default."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

import httpx
import pytest
import websockets
from channels.testing import ApplicationCommunicator

from routing import application
from tests.conftest import chat_body, sse_json
from tests.inprocess import http_scope
from tests.processes import LiveServer, Process, free_port, migrated_database, procfile_daphne_argv
from tripod.patches.http_limits import RequestBodyLimit

HEADER_TIMEOUT = 1
IDLE_TIMEOUT = 2
# How long a test waits for an answer before it fails; the old code never answered these at all.
GUARD = 30


@pytest.fixture(scope="module")
def edge():
    """Default limits (body, WebSocket frame), short header and idle timeouts."""
    server = LiveServer(
        {"TRIPOD_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "TRIPOD_HTTP_IDLE_TIMEOUT": str(IDLE_TIMEOUT)}
    )
    try:
        server.wait_ready()
        httpx.post(server.url + "/v1/completions", json={"prompt": "warm", "max_tokens": 1}, timeout=120)
        yield server
    finally:
        server.stop()


def connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=GUARD)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, then the end of the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"the server closed the connection without a response: {data!r}"
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        piece = sock.recv(65536)
        assert piece, "the response body was cut short"
        body += piece
    return status, headers, body


def error_code(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["code"]


def refusal(server: LiveServer, request: bytes) -> tuple[int, str]:
    """The status and error code ``server`` answers ``request`` with, sent whole on a connection of its own."""
    with connect(server) as sock:
        sock.sendall(request)
        status, _, body = read_response(sock)
        return status, error_code(body)


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_the_tests_start_daphne_as_the_procfile_does():
    argv = procfile_daphne_argv(8123)
    assert argv[1:3] == ["-m", "daphne"] and argv[-1] == "tripod.asgi:application"
    assert "8123" in argv and "127.0.0.1" in argv


def test_chunked_json_body(edge):
    body = json.dumps(chat_body(max_tokens=2)).encode()
    pieces = iter([body[:10], body[10:30], body[30:]])
    response = httpx.post(edge.url + "/v1/chat/completions", content=pieces, timeout=GUARD)
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_chunked_body_over_the_limit_is_cut_off(edge):
    """Read only as far as the limit: the 413 comes while the client is still sending."""
    limit = 4 * 1024 * 1024
    sock = connect(edge)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    sent = 0
    try:
        while sent <= limit + len(piece):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, headers, body = read_response(sock)
    assert status == 413 and error_code(body) == "request_too_large"
    assert headers["connection"] == "close"
    sock.close()


def test_content_length_over_the_limit_is_refused_before_the_body(edge):
    sock = connect(edge)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 300000000\r\n\r\n{"model"'
    )
    status, headers, body = read_response(sock)  # the other 299,999,992 bytes are never sent
    assert status == 413 and error_code(body) == "request_too_large"
    assert "4194304" in json.loads(body)["error"]["message"]
    assert closed_by_server(sock)
    sock.close()


async def _asgi_post_without_length(pieces: list[bytes]) -> tuple[int, dict]:
    """Under any ASGI server: a body in several messages and no Content-Length, as a chunked upload arrives."""
    scope = http_scope("/v1/chat/completions", b"")
    scope["headers"] = [(n, v) for n, v in scope["headers"] if n != b"content-length"]
    scope["headers"].append((b"transfer-encoding", b"chunked"))
    communicator = ApplicationCommunicator(RequestBodyLimit(application), scope)
    for i, piece in enumerate(pieces):
        await communicator.send_input({"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1})
    start = await communicator.receive_output(GUARD)
    body = await communicator.receive_output(GUARD)
    await communicator.wait(GUARD)
    return start["status"], json.loads(body["body"])


@pytest.mark.django_db(transaction=True)
async def test_a_body_without_content_length_reaches_the_view():
    status, body = await _asgi_post_without_length([b'{"messages": ', b"5}"])
    assert status == 400 and body["error"]["param"] == "messages", body  # parsed, not "the body is empty"


@pytest.mark.django_db(transaction=True)
async def test_a_body_without_content_length_over_the_limit_gets_413():
    status, body = await _asgi_post_without_length([b"x" * (1 << 20)] * 5)
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_a_long_request_line_gets_414(edge):
    assert refusal(edge, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n") == (414, "uri_too_long")


def test_oversized_header_gets_431(edge):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert refusal(edge, request) == (431, "request_header_fields_too_large")


def test_many_headers_over_the_total_get_431(edge):
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(20))
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    assert refusal(edge, request) == (431, "request_header_fields_too_large")


def test_headers_under_the_limit_still_work(edge):
    response = httpx.get(edge.url + "/healthz", headers={"X-Padding": "p" * 8000}, timeout=GUARD)
    assert response.status_code == 200


def test_half_sent_headers_are_closed_after_the_header_timeout(edge):
    """Many connections that never finish their headers, one of them trickling a byte at a time, which an
    idle timeout alone would never end: every one gets a 408 and is closed."""
    socks = [connect(edge) for _ in range(20)]
    for sock in socks:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    trickler = connect(edge)
    trickler.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
    trickler.settimeout(0.3)
    answer = b""
    for _ in range(int(GUARD / 0.3)):
        try:
            trickler.sendall(b"a")
            answer += trickler.recv(65536)
            break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    for sock in socks:
        status, _, body = read_response(sock)
        assert status == 408 and error_code(body) == "request_timeout"
        assert closed_by_server(sock)
        sock.close()
    trickler.close()


def test_a_body_that_stops_coming_is_closed_after_the_idle_timeout(edge):
    sock = connect(edge)
    sock.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model": ')
    status, _, body = read_response(sock)
    assert status == 408 and error_code(body) == "request_timeout"
    sock.close()


def test_an_idle_keep_alive_connection_is_closed(edge):
    sock = connect(edge)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, _ = read_response(sock)
    assert status == 200
    assert closed_by_server(sock)  # no 408: no request was under way
    sock.close()


def test_a_keep_alive_connection_pausing_longer_than_the_header_timeout_works(edge):
    """The header timeout counts from a request's first byte, not from the end of the previous response."""
    sock = connect(edge)
    for _ in range(2):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = read_response(sock)
        assert status == 200
        time.sleep(HEADER_TIMEOUT + 0.5)  # under the idle timeout
    sock.close()


def test_a_stream_longer_than_the_timeouts_completes(edge):
    """The timeouts stop counting once a request is in: a stream runs as long as it needs. Longer streams are
    tried until one outlives both timeouts (not a speed check: the test means something only then)."""
    for max_tokens in (16, 64, 256, 1024, 2000):  # 2000: near the tiny model's 2,048-token window
        started = time.monotonic()
        response = httpx.post(
            edge.url + "/v1/chat/completions",
            json=chat_body(max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}),
            timeout=httpx.Timeout(GUARD, read=None),
        )
        assert response.status_code == 200
        assert sse_json(response.text)[-1]["usage"]["completion_tokens"] == max_tokens
        assert response.text.rstrip().endswith("data: [DONE]")
        if time.monotonic() - started > IDLE_TIMEOUT + HEADER_TIMEOUT + 0.5:
            return
    pytest.fail("no stream outlived the timeouts")


async def _run_to_done(ws, request_id: str) -> dict:
    while True:
        frame = json.loads(await ws.recv())
        if frame.get("id") == request_id and frame["type"] in ("done", "error"):
            return frame


async def test_websocket_frame_over_the_default_limit_gets_an_error_frame(edge):
    """1.5 MiB is over TRIPOD_WS_MAX_FRAME_BYTES (1 MiB by default) but under daphne's limit: the frame gets
    ``frame_too_large`` and the generation already running on the socket goes on."""
    async with websockets.connect(edge.ws_url + "/ws/chat/", max_size=None) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "long", **chat_body(max_tokens=30)}))
        first = json.loads(await ws.recv())
        assert first["id"] == "long" and first["type"] != "error", first
        big = json.dumps({"type": "chat", "id": "big", **chat_body("x" * (3 * 512 * 1024))})
        await ws.send(big)
        frames = [first]
        while not (errors := [f for f in frames if f["type"] == "error"]) or not any(
            f["type"] == "done" and f["id"] == "long" for f in frames
        ):
            frames.append(json.loads(await ws.recv()))  # the old code: the socket closed here
        assert errors[0]["error"]["code"] == "frame_too_large" and errors[0]["id"] is None, errors
        assert "1048576" in errors[0]["error"]["message"]
        done = next(f for f in frames if f["type"] == "done")
        assert done["id"] == "long" and done["usage"]["completion_tokens"] == 30
        await ws.send(json.dumps({"type": "chat", "id": "after", **chat_body(max_tokens=2)}))
        assert (await _run_to_done(ws, "after"))["type"] == "done"


async def test_websocket_message_over_daphnes_limit_ends_only_that_socket(edge):
    """Over daphne's own limit, max(16 MiB, 4 x TRIPOD_WS_MAX_FRAME_BYTES), daphne (autobahn) fails the socket:
    it closes it with 1009, which a client still sending sees as a reset. Other sockets go on."""
    async with websockets.connect(edge.ws_url + "/ws/chat/", max_size=None) as other:
        async with websockets.connect(edge.ws_url + "/ws/chat/", max_size=None) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.send("x" * (17 * 1024 * 1024))
                await asyncio.wait_for(ws.recv(), GUARD)
        assert closed.value.rcvd is None or closed.value.rcvd.code == 1009
        await other.send(json.dumps({"type": "chat", "id": "still", **chat_body(max_tokens=2)}))
        assert (await _run_to_done(other, "still"))["type"] == "done"


async def test_runserver_gets_the_same_limits():
    """``manage.py runserver`` (daphne's, what ``make run`` starts) with its own defaults gets the raised
    WebSocket limit and the HTTP limits too: they come from the application, not from a command line."""
    port = free_port()
    argv = [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]
    server = Process("runserver", argv, {"TRIPOD_DB_PATH": migrated_database()})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.alive() and time.monotonic() < deadline, server.output()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                await asyncio.sleep(0.2)
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/chat/", max_size=None) as ws:
            await ws.send(json.dumps({"type": "chat", "id": "big", **chat_body("x" * (3 * 512 * 1024))}))
            frame = json.loads(await asyncio.wait_for(ws.recv(), GUARD))
            assert frame["type"] == "error" and frame["error"]["code"] == "frame_too_large"
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n{")
            status, _, body = read_response(sock)
            assert status == 413 and error_code(body) == "request_too_large"
    finally:
        server.stop()
