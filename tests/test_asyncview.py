"""Generation requests stay on the event loop: DRF's checks, the parsing and the job run there, not in a thread."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from asgiref.sync import sync_to_async

from routing import application
from tests.conftest import chat_body, sse_events
from tests.inprocess import HTTPExchange
from tripod.accounts import keys as auth
from tripod.api.views import ChatCompletionsView
from tripod.models import APIKey

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_streamed_request_is_parsed_and_submitted_on_the_event_loop(monkeypatch):
    threads = []
    parse = ChatCompletionsView.parse

    def recording(self, data):
        threads.append(threading.current_thread())
        return parse(self, data)

    monkeypatch.setattr(ChatCompletionsView, "parse", recording)
    for stream in (True, False):
        exchange = HTTPExchange(application, "/v1/chat/completions", chat_body(max_tokens=3, stream=stream))
        assert await exchange.start() == 200
        raw = (await exchange.read_all()).decode()
        if stream:
            assert sse_events(raw)[-1] == "[DONE]"
        else:
            assert json.loads(raw)["usage"]["completion_tokens"] == 3
    assert threads == [threading.current_thread()] * 2


async def test_a_stored_key_is_looked_up_in_a_thread_once_then_answered_on_the_loop(monkeypatch):
    key = auth.generate_key()
    await sync_to_async(APIKey.objects.create)(name="loop", prefix=key[:8], hashed_key=auth.hash_key(key))
    auth.forget_cached_keys()
    lookups = []
    lookup = auth._lookup

    def recording(token, cached_only=False):
        if not cached_only:
            lookups.append(threading.current_thread())
        return lookup(token, cached_only)

    monkeypatch.setattr(auth, "_lookup", recording)
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        for _ in range(3):
            response = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200, response.text
        refused = await client.get("/v1/models", headers={"Authorization": "Bearer tpd_not-a-key"})
        missing = await client.get("/v1/models")
    assert len(lookups) == 2, "one database lookup per key; the cache answers the rest"
    assert threading.current_thread() not in lookups, "the database is never asked on the event loop"
    for response in (refused, missing):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="tripod"'
    auth.forget_cached_keys()


async def test_dropped_keys_cache_sends_the_check_back_to_the_database():
    auth.forget_cached_keys()
    with pytest.raises(auth._NeedsDatabase):
        auth.authenticate("tpd_anything", cached_only=True)
    assert await auth.authenticate_async(None) == auth.OPEN  # no key stored: the server is open
    assert auth.authenticate(None, cached_only=True) == auth.OPEN  # and now the cache knows it
