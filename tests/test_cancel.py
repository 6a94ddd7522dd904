"""A client that leaves stops the work: watched on the engine itself, not only on the response."""

from __future__ import annotations

import asyncio
import time

import pytest
from channels.testing import WebsocketCommunicator

from routing import application
from tests.conftest import chat_body
from tests.inprocess import HTTPExchange, wait_for

# Auth checks whether keys exist, so requests touch the database.
pytestmark = pytest.mark.django_db(transaction=True)

LONG = {"max_tokens": 1800, "ignore_eos": True}


def assert_cancelled_promptly(chat_model, before: int) -> None:
    new = list(chat_model.history)[before:]
    assert len(new) == 1, new
    record = new[0]
    assert record.cancelled, record
    # The StoppingCriteria saw the cancel at the first step after it was set.
    assert record.steps_after_cancel == 1, record
    assert record.completion_tokens < LONG["max_tokens"]


async def test_closing_an_sse_stream_cancels_the_generation(chat_model):
    before = len(chat_model.history)
    exchange = HTTPExchange(application, "/v1/chat/completions", chat_body(stream=True, **LONG))
    assert await exchange.start() == 200
    await exchange.read_until(b'"content"')
    assert chat_model.active_generations == 1
    await exchange.disconnect()
    await wait_for(lambda: chat_model.active_generations == 0, message="the engine to stop")
    assert_cancelled_promptly(chat_model, before)


async def test_a_client_that_leaves_a_non_streamed_request_cancels_the_generation(chat_model):
    """The generation views are async, so Django cancels them when the client hangs up, and the job closes."""
    before = len(chat_model.history)
    exchange = HTTPExchange(application, "/v1/chat/completions", chat_body(**LONG))
    await exchange.communicator.send_input({"type": "http.request", "body": exchange.body, "more_body": False})
    await wait_for(lambda: chat_model.active_generations == 1, message="the generation to start")
    await exchange.disconnect()
    await wait_for(lambda: chat_model.active_generations == 0, message="the engine to stop")
    assert_cancelled_promptly(chat_model, before)


async def test_closing_a_websocket_cancels_its_generations(chat_model):
    communicator = WebsocketCommunicator(application, "/ws/chat/")
    connected, _ = await communicator.connect()
    assert connected
    for request_id in ("a", "b"):
        await communicator.send_json_to({"type": "chat", "id": request_id, **chat_body(**LONG)})
    seen = set()
    while seen != {"a", "b"}:
        frame = await communicator.receive_json_from(10)
        if frame["type"] == "delta":
            seen.add(frame["id"])
    assert chat_model.active_generations == 2
    await communicator.disconnect()
    await wait_for(lambda: chat_model.active_generations == 0, message="the engine to stop")
    last_two = list(chat_model.history)[-2:]
    assert all(r.cancelled and r.steps_after_cancel == 1 for r in last_two), last_two


async def test_a_cancel_frame_stops_one_request_and_reports_exact_usage(chat_model):
    communicator = WebsocketCommunicator(application, "/ws/chat/")
    await communicator.connect()
    await communicator.send_json_to({"type": "chat", "id": 1, **chat_body(**LONG)})
    await communicator.send_json_to({"type": "chat", "id": 2, **chat_body(max_tokens=5)})
    frames, done = [], {}

    async def receive() -> dict:
        frame = await communicator.receive_json_from(10)
        frames.append(frame)
        if frame["type"] == "done":
            done[frame["id"]] = frame  # request 2 may well finish before request 1 shows its first text
        return frame

    while not ((frame := await receive())["type"] == "delta" and frame["id"] == 1):
        pass
    await communicator.send_json_to({"type": "cancel", "id": 1})
    while len(done) < 2:
        await receive()
    assert done[1]["finish_reason"] == "cancelled"
    streamed = sum(f.get("tokens", 0) for f in frames if f["type"] == "delta" and f["id"] == 1)
    assert 0 < done[1]["usage"]["completion_tokens"] < LONG["max_tokens"]
    assert streamed <= done[1]["usage"]["completion_tokens"]
    assert done[2]["finish_reason"] == "length" and done[2]["usage"]["completion_tokens"] == 5
    await communicator.disconnect()
    cancelled = [r for r in list(chat_model.history)[-2:] if r.cancelled]
    assert len(cancelled) == 1 and cancelled[0].steps_after_cancel == 1


async def test_cancelling_a_queued_request_means_it_never_runs(chat_model):
    """With every slot busy the 5th request waits in the job channel; cancelling it skips it for good.

    A socket runs at most its fair share (half the 4 slots), so two sockets fill the slots and a third queues."""
    fillers = [WebsocketCommunicator(application, "/ws/chat/") for _ in range(2)]
    waiting = WebsocketCommunicator(application, "/ws/chat/")
    for communicator in (*fillers, waiting):
        await communicator.connect()
    before = len(chat_model.history)
    for communicator in fillers:
        for i in range(2):
            await communicator.send_json_to({"type": "chat", "id": i, **chat_body(**LONG)})
        started = set()
        while len(started) < 2:
            frame = await communicator.receive_json_from(10)
            if frame["type"] == "start":
                started.add(frame["id"])
    assert chat_model.active_generations == 4
    await waiting.send_json_to({"type": "chat", "id": "queued", **chat_body(max_tokens=5)})
    await waiting.send_json_to({"type": "cancel", "id": "queued"})
    frame = await waiting.receive_json_from(10)
    assert frame == {"type": "done", "id": "queued", "finish_reason": "cancelled", "usage": None}
    for communicator in fillers:
        for i in range(2):
            await communicator.send_json_to({"type": "cancel", "id": i})
        done = set()
        while len(done) < 2:
            frame = await communicator.receive_json_from(10)
            if frame["type"] == "done":
                done.add(frame["id"])
    for communicator in (*fillers, waiting):
        await communicator.disconnect()
    await wait_for(lambda: chat_model.active_generations == 0, message="the engine to stop")
    # Give the worker the chance to pull the cancelled job: it must skip it.
    await asyncio.sleep(0.5)
    new = list(chat_model.history)[before:]
    assert len(new) == 4 and all(r.cancelled for r in new)


async def test_a_cancel_during_tokenization_still_stops_the_job(chat_model, monkeypatch):
    """The client leaves while the worker is still preparing the job: the cancel must not be lost."""
    original = chat_model.encode

    def slow_encode(prompt, tools=None):
        time.sleep(0.5)
        return original(prompt)

    monkeypatch.setattr(chat_model, "encode", slow_encode)
    before = len(chat_model.history)
    communicator = WebsocketCommunicator(application, "/ws/chat/")
    await communicator.connect()
    await communicator.send_json_to({"type": "chat", "id": "slow", **chat_body(**LONG)})
    await asyncio.sleep(0.2)
    await communicator.send_json_to({"type": "cancel", "id": "slow"})
    frame = await communicator.receive_json_from(10)
    assert frame == {"type": "done", "id": "slow", "finish_reason": "cancelled", "usage": None}
    await wait_for(lambda: len(chat_model.history) > before, message="the job to end")
    record = chat_model.history[-1]
    assert record.cancelled and record.completion_tokens < 50, record
    await communicator.disconnect()
