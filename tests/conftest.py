"""Shared fixtures: the real tiny model in-process, and a real daphne on a free port."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.processes import ROOT, LiveServer, RedisServer

__all__ = ["ROOT"]


ENGINES = ["hf", "hf-cb"]


@pytest.fixture(scope="session", params=ENGINES)
def server(request) -> Iterator[LiveServer]:
    """A daphne on the embedded defaults (inline worker, tiny model), once per engine: every API test runs
    against both ``hf`` and ``hf-cb``."""
    live = LiveServer(
        {
            "TRIPOD_ENGINE": request.param,
            "TRIPOD_MAX_BODY_BYTES": "65536",
            "TRIPOD_WS_MAX_INFLIGHT": "4",
            "TRIPOD_LOG_LEVEL": "INFO",
        }
    )
    try:
        live.wait_ready()
        # Warm the model so that the first test does not pay for loading it.
        httpx.post(
            live.url + "/v1/completions", json={"prompt": "warm", "max_tokens": 1}, timeout=120
        ).raise_for_status()
        yield live
    finally:
        live.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port, for one test."""
    redis = RedisServer()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def redis_module() -> Iterator[RedisServer]:
    """A private redis-server shared by one test module."""
    redis = RedisServer()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture(scope="session")
def chat_model():
    """The in-process engine the inline worker of this test process uses."""
    from tripod.engines import get_chat_model

    return get_chat_model()


def chat_body(content: str = "Hello there, how are you?", **params) -> dict:
    """A chat request for the tiny model. ``ignore_eos`` by default: its random weights sample an end-of-text
    token now and then, and tests that count tokens must not depend on that luck."""
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "ignore_eos": True, **params}


def sse_events(raw: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in raw.split("\n") if line.startswith("data: ")]


def sse_json(raw: str) -> list[dict]:
    return [json.loads(data) for data in sse_events(raw) if data != "[DONE]"]
