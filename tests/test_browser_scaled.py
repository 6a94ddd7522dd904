"""The chat page in real headless Chromium against a scaled deployment: a private redis-server, two daphne web
processes and one ``python -m asgi_worker``.

The page holds a WebSocket open for as long as the tab lives; in scaled mode such an idle socket once starved its
whole web process of replies. Here a tab stays open on one web process while REST, SSE and the page itself are
served there and on the other one, and Stop reaches the worker in another process.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.browser import ChatPage, chromium_browser
from tests.conftest import chat_body
from tests.processes import Cluster, LiveServer, RedisServer, WorkerProcess

SAMPLING = {"temperature": 1.0, "seed": 99}
LENGTH = 40
PROMPT = "Tell me about rivers."


@pytest.fixture(scope="module")
def chromium():
    with chromium_browser() as browser:
        yield browser


@pytest.fixture(scope="module")
def scaled(redis_module: RedisServer) -> Iterator[tuple[list[LiveServer], WorkerProcess]]:
    with Cluster(redis_module) as cluster:
        yield cluster.start(webs=2, worker=["--slots", "4"], TRIPOD_LOG_LEVEL="WARNING", TRIPOD_QUEUE_TIMEOUT="20")


@pytest.fixture
def tab(chromium, scaled) -> Iterator[ChatPage]:
    """A fresh browser context on web process A's page; fails the test on any console error."""
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    page = ChatPage(context.new_page(), scaled[0][0].url)
    try:
        yield page.open()
    finally:
        context.close()
    assert page.problems == [], "the page logged errors"


def rest_reply(web: LiveServer, messages: list[dict], **params) -> str:
    body = {"model": "tiny", "messages": messages, **params}
    response = httpx.post(web.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_the_page_streams_and_its_open_socket_leaves_its_web_process_serving(tab, scaled, transport):
    (web_a, web_b), _ = scaled
    tab.configure(transport=transport, max_tokens=LENGTH, ignore_eos=True, **SAMPLING)
    reply = tab.send(PROMPT)
    assert tab.wait_state(reply, "done", "error", timeout=60_000) == "done"
    messages = [{"role": "user", "content": PROMPT}]
    # The same seeded request through the other web process gives the same text: one worker served both.
    expected = rest_reply(web_b, messages, max_tokens=LENGTH, ignore_eos=True, **SAMPLING)
    assert reply.get_attribute("data-raw") == expected
    # The tab stays open, its WebSocket idle: web process A still serves REST and SSE, within the queue timeout.
    assert rest_reply(web_a, messages, max_tokens=3) != ""
    streamed = httpx.post(web_a.url + "/v1/chat/completions", json=chat_body(max_tokens=3, stream=True), timeout=60)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]"), streamed.text
    # And the page's next turn too.
    second = tab.send("And about lakes?")
    assert tab.wait_state(second, "done", "error", timeout=60_000) == "done"


@pytest.mark.parametrize("transport", ["ws", "sse"])
def test_stop_in_the_page_stops_the_job_on_the_worker(tab, scaled, transport):
    (web_a, _), worker = scaled
    finished_before = len(worker.finished_jobs())
    tab.configure(transport=transport, max_tokens=1500, ignore_eos=True)
    reply = tab.send("Write a very long story.")
    tab.wait_text(reply, 1)
    tab.page.click("#stop")
    assert tab.wait_state(reply, "stopped", "done", "error", timeout=30_000) == "stopped"
    generated = int(reply.get_attribute("data-tokens"))
    assert 0 < generated < 1500
    deadline = time.monotonic() + 30
    while len(worker.finished_jobs()) == finished_before:
        assert time.monotonic() < deadline, "the worker never ended the stopped job"
        time.sleep(0.1)
    line = worker.finished_jobs()[-1]
    assert "finish_reason=cancelled" in line, line
    assert int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 1500
