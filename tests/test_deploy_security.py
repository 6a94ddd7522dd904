"""Deployment safety against real daphnes: the secret-key check, CSRF behind a TLS proxy, X-Frame-Options,
the admin login throttle, CORS, ``/docs`` without a network, and the worker's ``--help``."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.conftest import chat_body
from tests.processes import ROOT, SECRET_KEY, LiveServer, Process, free_port, manage
from tripod.engines.base import ENGINE_MODULES

APP = "https://app.example"
PUBLIC_HOST = "tripod.example"
# What nginx in the README's TLS setup sends on: the public host, and the scheme of the browser's request.
PROXIED = {"Host": PUBLIC_HOST, "Origin": f"https://{PUBLIC_HOST}", "X-Forwarded-Proto": "https"}


def started(env: dict[str, str]) -> Iterator[LiveServer]:
    live = LiveServer(env)
    try:
        yield live.wait_ready()
    finally:
        live.stop()


@pytest.fixture(scope="module")
def plain() -> Iterator[LiveServer]:
    """The embedded defaults: no proxy settings, no CORS, the built-in secret key."""
    yield from started({"DJANGO_SECRET_KEY": ""})


@pytest.fixture(scope="module")
def proxied() -> Iterator[LiveServer]:
    yield from started(
        {
            "DJANGO_SECRET_KEY": SECRET_KEY,
            "TRIPOD_SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
            "TRIPOD_CSRF_TRUSTED_ORIGINS": f"https://{PUBLIC_HOST}",
            "TRIPOD_CORS_ORIGINS": f"{APP},https://other.example",
            # As the README's TLS setup says; the tests reach it as 127.0.0.1 as well.
            "TRIPOD_ALLOWED_HOSTS": f"{PUBLIC_HOST},127.0.0.1",
        }
    )


@pytest.fixture(scope="module")
def throttled() -> Iterator[LiveServer]:
    yield from started({"TRIPOD_ADMIN_LOGIN_ATTEMPTS": "3", "TRIPOD_CORS_ORIGINS": "*"})


def create_superuser(server: LiveServer, username: str, password: str) -> None:
    code = f"from django.contrib.auth.models import User; User.objects.create_superuser({username!r}, '', {password!r})"
    result = manage(server.db_path, "shell", "-c", code)
    assert result.returncode == 0, result.stderr


def admin_login(server: LiveServer, username: str, password: str, headers: dict[str, str] | None = None):
    """The admin's login form as a browser submits it: GET for the CSRF cookie and token, then POST."""
    with httpx.Client(base_url=server.url, headers=headers or {}, timeout=60) as client:
        page = client.get("/admin/login/")
        assert page.status_code == 200, page.text
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        form = {"csrfmiddlewaretoken": token, "username": username, "password": password, "next": "/admin/"}
        response = client.post("/admin/login/?next=/admin/", data=form)
        return response, client.cookies.get("sessionid")


# --- DJANGO_SECRET_KEY ---------------------------------------------------------------------------------------


def daphne(bind: str, env: dict[str, str]) -> Process:
    """A daphne with the built-in secret key, expected to refuse to start."""
    argv = [sys.executable, "-m", "daphne", "-b", bind, "-p", str(free_port()), "tripod.asgi:application"]
    return Process("daphne-secret-key", argv, {"DJANGO_SECRET_KEY": "", **env})


def refused(process: Process) -> str:
    try:
        returncode = process.process.wait(120)
    finally:
        process.stop()
    output = process.output()
    assert returncode != 0, output
    assert "Refusing to start: DJANGO_SECRET_KEY is not set" in output, output
    return output


def test_the_default_secret_key_is_refused_in_scaled_mode():
    # No Redis needed: the check runs before anything connects.
    output = refused(daphne("127.0.0.1", {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}))
    assert "REDIS_URL is set" in output


def test_the_default_secret_key_is_refused_off_loopback():
    output = refused(daphne("0.0.0.0", {}))
    assert "interface=0.0.0.0" in output


def test_the_default_secret_key_is_allowed_with_debug_and_on_loopback_with_a_warning(plain):
    port = free_port()
    debug = Process(
        "daphne-debug",
        [sys.executable, "-m", "daphne", "-b", "0.0.0.0", "-p", str(port), "tripod.asgi:application"],
        {"DJANGO_SECRET_KEY": "", "DJANGO_DEBUG": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while "Listening on TCP address" not in debug.output():
            assert debug.alive() and time.monotonic() < deadline, debug.output()
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        assert "built-in development key (allowed: DJANGO_DEBUG=1)" in debug.output()
    finally:
        debug.stop()
    assert "built-in development key (allowed: embedded mode on 127.0.0.1 only)" in plain.output()


def test_a_set_secret_key_starts_without_a_warning(proxied):
    assert httpx.get(proxied.url + "/healthz").status_code == 200
    assert "built-in development key" not in proxied.output()


# --- admin behind a TLS proxy -----------------------------------------------------------------------------


def test_admin_login_behind_a_tls_proxy_needs_the_proxy_settings(plain, proxied):
    create_superuser(plain, "admin", "right-password")
    create_superuser(proxied, "admin", "right-password")
    # Without them, Django takes the proxied HTTPS request for HTTP, and the browser's https Origin fails CSRF.
    response, session = admin_login(plain, "admin", "right-password", PROXIED)
    assert response.status_code == 403 and "CSRF" in response.text and session is None
    # TRIPOD_SECURE_PROXY_SSL_HEADER: the request is secure, its Origin matches.
    response, session = admin_login(proxied, "admin", "right-password", PROXIED)
    assert response.status_code == 302 and response.headers["location"] == "/admin/", response.text
    assert session
    # TRIPOD_CSRF_TRUSTED_ORIGINS alone (a proxy that sets no X-Forwarded-Proto).
    response, session = admin_login(proxied, "admin", "right-password", {**PROXIED, "X-Forwarded-Proto": ""})
    assert response.status_code == 302 and session


def test_pages_cannot_be_framed(plain):
    for path in ("/admin/login/", "/", "/docs", "/v1/models"):
        assert httpx.get(plain.url + path).headers.get("x-frame-options") == "DENY", path


def test_admin_login_is_throttled_per_address_and_username(throttled):
    create_superuser(throttled, "admin", "right-password")
    for _ in range(3):
        response, session = admin_login(throttled, "admin", "wrong-password")
        assert response.status_code == 200 and "Please enter the correct username" in response.text
    # Locked: the right password is not even checked, and the lock names when it ends.
    response, session = admin_login(throttled, "admin", "right-password")
    assert response.status_code == 429 and session is None
    assert 1 <= int(response.headers["retry-after"]) <= 300
    # The address is locked for every username.
    response, _ = admin_login(throttled, "someone-else", "anything")
    assert response.status_code == 429


# --- CORS -----------------------------------------------------------------------------------------------------


def test_cors_preflight_names_the_authorization_header(proxied):
    response = httpx.options(
        proxied.url + "/v1/chat/completions",
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == APP
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed and "last-event-id" in allowed
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in response.headers


def test_cors_covers_sse_streams_and_errors(proxied):
    with httpx.stream(
        "POST",
        proxied.url + "/v1/chat/completions",
        json=chat_body(max_tokens=2, stream=True),
        headers={"Origin": APP},
        timeout=120,
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["access-control-allow-origin"] == APP
        assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
        assert "data: [DONE]" in response.read().decode()
    stream = httpx.post(proxied.url + "/v1/streams", json=chat_body(max_tokens=2), headers={"Origin": APP}, timeout=60)
    assert stream.status_code == 201 and stream.headers["access-control-allow-origin"] == APP
    events = httpx.get(proxied.url + stream.json()["url"], headers={"Origin": APP}, timeout=120)
    assert events.status_code == 200 and events.headers["access-control-allow-origin"] == APP
    error = httpx.post(proxied.url + "/v1/chat/completions", json={"messages": "hi"}, headers={"Origin": APP})
    assert error.status_code == 400 and error.headers["access-control-allow-origin"] == APP


def test_cors_refuses_other_origins_the_admin_and_is_off_by_default(proxied, plain, throttled):
    other = httpx.get(proxied.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    admin = httpx.get(proxied.url + "/admin/login/", headers={"Origin": APP})
    assert "access-control-allow-origin" not in admin.headers
    default = httpx.get(plain.url + "/v1/models", headers={"Origin": APP})
    assert "access-control-allow-origin" not in default.headers
    anyone = httpx.get(throttled.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert anyone.headers["access-control-allow-origin"] == "*"


def test_a_page_cors_allows_may_open_a_websocket_and_others_may_not(proxied, throttled):
    async def chat(server: LiveServer, origin: str) -> dict:
        async with websockets.connect(server.ws_url + "/ws/chat/", origin=origin, open_timeout=30) as ws:
            await ws.send(json.dumps({"type": "chat", "id": "1", **chat_body(max_tokens=2)}))
            while (frame := json.loads(await ws.recv()))["type"] not in ("done", "error"):
                pass
            return frame

    assert asyncio.run(chat(proxied, APP))["type"] == "done"
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(chat(proxied, "https://evil.example"))
    assert refused.value.response.status_code == 403
    assert asyncio.run(chat(throttled, "https://evil.example"))["type"] == "done"


# --- /docs and --help -----------------------------------------------------------------------------------------


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.urls += [value for name, value in attrs if name in {"src", "href"} and value]


def test_docs_loads_swagger_ui_from_this_server(plain):
    page = httpx.get(plain.url + "/docs")
    assert page.status_code == 200
    links = Links()
    links.feed(page.text)
    assert any(url.endswith("swagger-ui-bundle.js") for url in links.urls), links.urls
    assert not re.search(r"https?://|//cdn", page.text.replace(plain.url, "")), "an external URL in /docs"
    for url in links.urls:
        assert url.startswith("/"), url
        asset = httpx.get(plain.url + url)
        assert asset.status_code == 200 and asset.content, url
        revalidated = httpx.get(plain.url + url, headers={"If-None-Match": asset.headers["etag"]})
        assert revalidated.status_code == 304
    assert httpx.get(plain.url + "/docs/ui/..%2Fsettings.py").status_code == 404


def test_worker_help_lists_every_engine():
    result = subprocess.run(
        [sys.executable, "-m", "asgi_worker", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for engine in ENGINE_MODULES:
        assert engine in result.stdout, engine
