"""How the worker merges deltas: TRIPOD_STREAM_INTERVAL for streamed replies, the fewest events for REST ones.

The real tiny model behind a real worker on the embedded channel layer; a slow engine is the model with a
forward hook that sleeps (fault injection: tests/faults.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from django.core.exceptions import ImproperlyConfigured

from routing import application
from tests.conftest import ROOT, chat_body, sse_json
from tests.faults import slow_forwards
from tests.inprocess import HTTPExchange

pytestmark = pytest.mark.django_db(transaction=True)

TOKENS = 21
MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


async def worker_events(chat_model, max_tokens: int = TOKENS, **job) -> list[dict]:
    """Every event one job gets from a real worker, in order; ``job`` adds fields to the job message."""
    from asgi_worker.loop import Worker
    from tripod import job_protocol as wire
    from tripod.patches.inmemory_layer import LocalChannelLayer
    from tripod.protocol import SamplingParams

    layer = LocalChannelLayer()
    worker = Worker(layer, "tripod.generate.t", lambda: chat_model, 2)
    running = asyncio.create_task(worker.run())
    try:
        reply = await layer.new_channel("tripod.reply.")
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        message = wire.Job(uuid.uuid4().hex, reply, "t", params, time.time() + 60, messages=MESSAGES, **job)
        await layer.send("tripod.generate.t", wire.encode(message))
        received = []
        while not received or received[-1]["type"] not in (wire.Done.TYPE, wire.Error.TYPE):
            received.append(await asyncio.wait_for(layer.receive(reply), 30))
        return received
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)


def deltas(received: list[dict]) -> list[dict]:
    return [event for event in received if event["type"] == "generate.delta"]


async def test_an_interval_merges_deltas_after_the_first_and_keeps_every_token(chat_model):
    # Tokens 10 ms apart, so that each reaches the worker by itself (a faster engine's come in bunches anyway).
    with slow_forwards(chat_model, 0.01):
        plain = deltas(await worker_events(chat_model))
        merged_events = await worker_events(chat_model, stream_interval=4, stream_hold=60)
    merged = deltas(merged_events)
    assert "".join(d["text"] for d in merged) == "".join(d["text"] for d in plain)
    assert sum(d["tokens"] for d in merged) == TOKENS == merged_events[-1]["usage"]["completion_tokens"]
    assert [d["seq"] for d in merged] == list(range(len(merged)))
    # The first delta goes out as it comes (time to first token); each later one waits for 4 tokens, but the last.
    assert all(d["tokens"] >= 4 for d in merged[1:-1]), [d["tokens"] for d in merged]
    assert len(merged) <= 1 + -(-(TOKENS - 1) // 4) < len(plain)


@pytest.mark.parametrize(
    ("generations", "interval"),
    [(0, 1), (1, 1), (16, 1), (17, 2), (32, 2), (33, 3), (48, 3), (49, 4), (64, 4), (500, 4)],
)
def test_the_auto_interval_grows_by_a_token_for_each_sixteen_generations_up_to_four(generations, interval):
    from asgi_worker.serve import auto_stream_interval

    assert auto_stream_interval(generations) == interval


async def test_the_auto_interval_follows_the_workers_load(chat_model, monkeypatch):
    """``auto`` asks the worker's load before each delta: one generation alone streams every token; when the load
    asks for 4 (one generation counted as 16 here), the deltas merge as with an interval of 4."""
    with slow_forwards(chat_model, 0.01):
        plain = deltas(await worker_events(chat_model))
        alone = deltas(await worker_events(chat_model, stream_interval="auto", stream_hold=60))
        monkeypatch.setattr("asgi_worker.serve.AUTO_STREAMS_PER_TOKEN", 0.25)
        loaded_events = await worker_events(chat_model, stream_interval="auto", stream_hold=60)
    loaded = deltas(loaded_events)
    assert [d["tokens"] for d in alone] == [d["tokens"] for d in plain]
    assert "".join(d["text"] for d in loaded) == "".join(d["text"] for d in plain)
    assert sum(d["tokens"] for d in loaded) == TOKENS == loaded_events[-1]["usage"]["completion_tokens"]
    assert all(d["tokens"] >= 4 for d in loaded[1:-1]), [d["tokens"] for d in loaded]
    assert len(loaded) <= 1 + -(-(TOKENS - 1) // 4) < len(plain)


async def test_a_reply_that_is_not_streamed_gets_the_first_delta_then_the_rest_at_the_end(chat_model):
    received = await worker_events(chat_model, stream_interval=0, stream_hold=60)
    merged = deltas(received)
    assert len(merged) == 2, [d["tokens"] for d in merged]
    assert sum(d["tokens"] for d in merged) == TOKENS
    assert received[-1]["type"] == "generate.done" and received[-1]["finish_reason"] == "length"


async def test_a_slow_engine_still_sends_each_token_once_the_hold_has_passed(chat_model):
    # 6 tokens 0.25 s apart, 100 tokens per delta asked for, held at most 0.4 s: about one delta per two tokens.
    with slow_forwards(chat_model, 0.25):
        received = await worker_events(chat_model, max_tokens=6, stream_interval=100, stream_hold=0.4)
    counts = [d["tokens"] for d in deltas(received)]
    assert sum(counts) == 6
    assert 2 < len(counts) < 6, counts  # 2: the hold was ignored; 6: nothing was held


async def _sse_contents(payload: dict) -> list[str]:
    exchange = HTTPExchange(application, "/v1/chat/completions", payload)
    assert await exchange.start() == 200
    chunks = sse_json((await exchange.read_all()).decode())
    pieces = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    return [piece["content"] for piece in pieces if piece.get("content")]


async def test_stream_interval_setting_merges_sse_chunks(chat_model, settings, monkeypatch):
    body = chat_body(max_tokens=TOKENS, stream=True, temperature=0)
    with slow_forwards(chat_model, 0.01):
        plain = await _sse_contents(body)
        monkeypatch.setattr("consumers.job_admission.STREAM_HOLD_SECONDS", 60)
        settings.TRIPOD = {**settings.TRIPOD, "STREAM_INTERVAL": 4}
        merged = await _sse_contents(body)
    assert "".join(merged) == "".join(plain)
    assert len(merged) <= 6 < len(plain), (len(merged), len(plain))


@pytest.fixture
def worker_sends(monkeypatch) -> list[dict]:
    """Every message sent on the embedded channel layer while the test runs."""
    from tripod.patches.inmemory_layer import LocalChannelLayer

    sent: list[dict] = []
    original = LocalChannelLayer.send

    async def send(self, channel, message):
        sent.append(message)
        await original(self, channel, message)

    monkeypatch.setattr(LocalChannelLayer, "send", send)
    return sent


async def test_a_rest_request_costs_two_deltas_and_loses_no_text(chat_model, monkeypatch, worker_sends):
    streamed = "".join(await _sse_contents(chat_body(max_tokens=TOKENS, stream=True, temperature=0)))
    worker_sends.clear()
    monkeypatch.setattr("consumers.job_admission.UNSTREAMED_HOLD_SECONDS", 60)
    with slow_forwards(chat_model, 0.01):
        exchange = HTTPExchange(application, "/v1/chat/completions", chat_body(max_tokens=TOKENS, temperature=0))
        assert await exchange.start() == 200
        body = json.loads(await exchange.read_all())
    assert body["choices"][0]["message"]["content"] == streamed
    assert body["usage"]["completion_tokens"] == TOKENS
    assert len([m for m in worker_sends if m["type"] == "generate.delta"]) == 2


async def test_a_held_back_rest_reply_still_beats_a_short_event_timeout(chat_model, settings):
    """Holding text back must not look like a silent worker: the hold stays well inside the event timeout."""
    settings.TRIPOD = {**settings.TRIPOD, "EVENT_TIMEOUT": 0.6}
    # 12 tokens: about 1.2 s, twice the event timeout.
    with slow_forwards(chat_model, 0.1):
        exchange = HTTPExchange(application, "/v1/chat/completions", chat_body(max_tokens=12, temperature=0))
        status = await exchange.start()
        body = json.loads(await exchange.read_all())
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 12


def test_a_process_with_a_stream_interval_below_one_stops_at_start():
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env={**os.environ, "TRIPOD_STREAM_INTERVAL": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "TRIPOD_STREAM_INTERVAL must be 1 or more; it is 0." in result.stderr


def test_the_stream_interval_is_auto_by_default_and_a_word_other_than_auto_is_refused(settings):
    from tripod.conf import config

    assert config().stream_interval == "auto"
    settings.TRIPOD = {**settings.TRIPOD, "STREAM_INTERVAL": "fast"}
    with pytest.raises(ImproperlyConfigured, match="TRIPOD_STREAM_INTERVAL must be 'auto' or 1 or more; it is 'fast'"):
        config()


def test_a_stream_interval_below_one_is_refused(settings):
    from tripod.conf import config

    settings.TRIPOD = {**settings.TRIPOD, "STREAM_INTERVAL": 0}
    with pytest.raises(ImproperlyConfigured, match="TRIPOD_STREAM_INTERVAL must be 1 or more"):
        config()


def test_an_unknown_tool_parser_is_refused_at_start(settings):
    from tripod.conf import config

    settings.TRIPOD = {**settings.TRIPOD, "TOOL_PARSER": "qwen9"}
    with pytest.raises(ImproperlyConfigured, match="TRIPOD_TOOL_PARSER must be one of hermes, llama3, mistral"):
        config()
