"""Server-Sent Events: framing through a real daphne, keep-alives and failures in-process."""

from __future__ import annotations

import json

import httpx
import pytest

from routing import application
from tests.conftest import chat_body, sse_events, sse_json
from tests.faults import slow_forwards
from tests.inprocess import HTTPExchange

# Auth checks whether keys exist, so requests touch the database.
pytestmark = pytest.mark.django_db(transaction=True)


def test_sse_framing_over_http(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=chat_body(max_tokens=10, stream=True, stream_options={"include_usage": True}),
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        raw = "".join(response.iter_text())
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in chunks[:-1])


def test_without_include_usage_no_usage_field(server):
    response = httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=3, stream=True), timeout=30)
    chunks = sse_json(response.text)
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.fixture
def slow_prefill(chat_model, settings):
    """The first token of the next request comes after 0.6 s; keep-alives every 0.1 s."""
    settings.TRIPOD = {**settings.TRIPOD, "SSE_KEEPALIVE": 0.1}
    with slow_forwards(chat_model, 0.6, first_only=True):
        yield


async def test_keepalive_comments_while_waiting_for_the_first_token(slow_prefill):
    exchange = HTTPExchange(application, "/v1/chat/completions", chat_body(max_tokens=3, stream=True))
    assert await exchange.start() == 200
    raw = (await exchange.read_all()).decode()
    first_data = raw.index("data: ")
    assert raw[:first_data].count(": keep-alive\n\n") >= 2, raw[:200]
    assert sse_events(raw)[-1] == "[DONE]"


@pytest.fixture
def silent_worker(chat_model, settings):
    """The worker admits the request, then sends nothing for 1.5 s, three times the event timeout."""
    settings.TRIPOD = {**settings.TRIPOD, "SSE_KEEPALIVE": 0.1, "EVENT_TIMEOUT": 0.5}
    with slow_forwards(chat_model, 1.5, first_only=True):
        yield


async def test_a_worker_that_goes_silent_ends_the_stream_with_worker_timeout(silent_worker):
    exchange = HTTPExchange(application, "/v1/chat/completions", chat_body(max_tokens=3, stream=True))
    assert await exchange.start() == 200
    raw = (await exchange.read_all()).decode()
    assert raw.count(": keep-alive\n\n") >= 2, raw[:200]
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "worker_timeout" and "sent nothing for 0.5 s" in error["message"]


@pytest.fixture
def failing_engine(chat_model):
    """Fault injection: the engine raises after its third decode step."""
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("injected GPU fault")

    handle = chat_model.model.model.layers[0].register_forward_pre_hook(hook)
    yield
    handle.remove()


async def test_engine_failure_mid_stream_ends_with_an_error_event(failing_engine):
    exchange = HTTPExchange(application, "/v1/chat/completions", chat_body(max_tokens=50, stream=True, ignore_eos=True))
    assert await exchange.start() == 200
    raw = (await exchange.read_all()).decode()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_error" and "injected GPU fault" in error["message"]
    assert error["type"] == "server_error"


async def test_engine_failure_without_streaming_is_a_500_in_openai_shape(failing_engine):
    exchange = HTTPExchange(application, "/v1/chat/completions", chat_body(max_tokens=50, ignore_eos=True))
    assert await exchange.start() == 500
    body = json.loads(await exchange.read_all())
    assert body["error"]["code"] == "engine_error"
