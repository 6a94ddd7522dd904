"""Django's middleware under ASGI: on the event loop for API requests, and the admin's login still works."""

from __future__ import annotations

import re

import httpx
import pytest
from django.utils import deprecation

from tests.processes import LiveServer, manage
from tripod.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


async def test_api_requests_make_no_middleware_thread_hops(monkeypatch):
    hops = []
    original = deprecation.sync_to_async

    def counting(func, *args, **kwargs):
        hops.append(getattr(func, "__qualname__", repr(func)))
        return original(func, *args, **kwargs)

    # MiddlewareMixin looks sync_to_async up in its module on every hook it hands to a thread.
    monkeypatch.setattr(deprecation, "sync_to_async", counting)
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        for path in ("/healthz", "/v1/models", "/v1/no-such-endpoint"):
            response = await client.get(path)
            assert response.status_code in (200, 404), response.text
            assert response.headers["X-Content-Type-Options"] == "nosniff"  # Django's SecurityMiddleware still ran
    assert hops == []


def test_the_admin_login_keeps_its_csrf_check_and_session_over_asgi(monkeypatch):
    server = LiveServer()
    try:
        server.wait_ready()
        monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "s3cret-pass")  # read by createsuperuser --noinput
        created = manage(
            server.db_path, "createsuperuser", "--noinput", "--username", "root", "--email", "root@example.com"
        )
        assert created.returncode == 0, created.stderr
        with httpx.Client(base_url=server.url, timeout=30) as client:
            page = client.get("/admin/login/")
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
            credentials = {"username": "root", "password": "s3cret-pass"}
            refused = client.post("/admin/login/", data=credentials, headers={"Referer": server.url + "/admin/"})
            assert refused.status_code == 403  # no CSRF token: Django's check ran
            login = client.post(
                "/admin/login/",
                data={**credentials, "csrfmiddlewaretoken": token, "next": "/admin/"},
                headers={"Referer": server.url + "/admin/login/"},
            )
            assert login.status_code == 302 and login.headers["location"] == "/admin/"
            assert "sessionid" in client.cookies  # the changed session was saved and sent
            home = client.get("/admin/")
            assert home.status_code == 200 and "Site administration" in home.text
    finally:
        server.stop()
