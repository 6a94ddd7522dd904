"""Shared fixtures: the real tiny model in-process, a real daphne on a free port, a private redis-server and a
scaled ``cluster`` on it.

Tests that start processes (daphne, workers, redis-server, PostgreSQL, Chromium, any ``subprocess``) get the
``slow`` marker here, found from their code and their fixtures' code, so that ``pytest -m "not slow"`` is the
fast inner loop; a test that runs long in-process says ``@pytest.mark.slow`` itself.
"""

from __future__ import annotations

import inspect
import json
import types
from collections.abc import Iterator

import httpx
import pytest

from tests.processes import ROOT, Cluster, LiveServer, RedisServer

__all__ = ["ROOT"]

# What starts a process: a test, fixture or test helper whose code names one of these is slow.
PROCESS_STARTERS = frozenset(
    {"subprocess", "LiveServer", "WorkerProcess", "RedisServer", "PostgresServer", "chromium_browser", "manage"}
)

# In-process tests that run long (8 s or more each on the 2-core machine, `pytest --durations`): slow too.
LONG_RUNS = frozenset(
    {
        "tests/test_train.py::test_merged_lora_is_a_plain_model_directory",
        "tests/test_sse.py::test_a_worker_that_goes_silent_ends_the_stream_with_worker_timeout",
        "tests/test_coalescing.py::test_a_rest_request_costs_two_deltas_and_loses_no_text",
        "tests/test_coalescing.py::test_the_auto_interval_follows_the_workers_load",
        "tests/test_coalescing.py::test_a_reply_that_is_not_streamed_gets_the_first_delta_then_the_rest_at_the_end",
    }
)


def _names(code: types.CodeType) -> set[str]:
    """The global and attribute names ``code`` and the functions nested in it refer to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _starts_processes(obj: object, seen: set[int]) -> bool:
    """Whether a function (or a class's methods) names a process starter, directly or through a helper
    defined in ``tests``."""
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if inspect.isclass(obj):
        return any(_starts_processes(member, seen) for member in vars(obj).values())
    obj = inspect.unwrap(getattr(obj, "__func__", obj))
    code = getattr(obj, "__code__", None)
    if code is None:
        return False
    names = _names(code)
    if names & PROCESS_STARTERS:
        return True
    helpers = (getattr(obj, "__globals__", {}).get(name) for name in names)
    return any(
        (inspect.isfunction(helper) or inspect.isclass(helper))
        and (getattr(helper, "__module__", "") or "").startswith("tests")
        and _starts_processes(helper, seen)
        for helper in helpers
    )


def pytest_collection_modifyitems(config, items) -> None:
    """Mark ``slow`` every test that starts a process, itself or through a fixture, and the long runs."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            continue
        if item.nodeid.split("[")[0] in LONG_RUNS:
            item.add_marker(pytest.mark.slow)
            continue
        seen: set[int] = set()
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if any(_starts_processes(f, seen) for f in [getattr(item, "function", None), *fixtures] if f is not None):
            item.add_marker(pytest.mark.slow)


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
    with RedisServer() as redis:
        yield redis


@pytest.fixture(scope="module")
def redis_module() -> Iterator[RedisServer]:
    """A private redis-server shared by one test module."""
    with RedisServer() as redis:
        yield redis


@pytest.fixture
def cluster(redis_server) -> Iterator[Cluster]:
    """A scaled deployment for one test on its private redis-server: it starts the web processes and workers it
    needs, and they are all stopped at its end."""
    with Cluster(redis_server) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def chat_model():
    """The in-process engine the inline worker of this test process uses."""
    from tripod.engines import get_chat_model

    return get_chat_model()


@pytest.fixture(scope="module")
def cb_model(chat_model):
    """An in-process ``hf-cb`` engine on the same tiny model, one per test module (its batching thread stops after)."""
    from tripod.engines import ChatModel

    model = ChatModel(engine="hf-cb", model_name="tiny", path=chat_model.tokenizer.name_or_path)
    model.load()
    yield model
    model.manager.stop(block=True)


def chat_body(content: str = "Hello there, how are you?", **params) -> dict:
    """A chat request for the tiny model. ``ignore_eos`` by default: its random weights sample an end-of-text
    token now and then, and tests that count tokens must not depend on that luck."""
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "ignore_eos": True, **params}


def sse_events(raw: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in raw.split("\n") if line.startswith("data: ")]


def sse_json(raw: str) -> list[dict]:
    return [json.loads(data) for data in sse_events(raw) if data != "[DONE]"]
