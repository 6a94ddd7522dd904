"""Scaled deployment: real redis-server, daphne processes and ``python -m asgi_worker`` processes.

Every fault the scale-out issue names is injected here: kill -9 of a worker mid-stream, SIGTERM,
a Redis restart, a client that leaves, and load spread over 2 web processes and 2 workers. Each fault is
met by SSE clients and by WebSocket clients (``transport``): a socket's generations travel the same jobs, but
its consumer once starved its whole web process of replies.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import httpx
import pytest
import redis.exceptions
import websockets

from tests.conftest import chat_body
from tests.processes import Cluster, LiveServer

LONG = {"max_tokens": 1500, "ignore_eos": True}
# Short beats: a stopped or killed process is dead after 1 s, so a test needs pauses of seconds, not tens of seconds.
BEATS = {"TRIPOD_HEARTBEAT_INTERVAL": "0.25", "TRIPOD_WORKER_TTL": "1"}


@pytest.fixture
def cluster(redis_server):
    """The shared ``cluster``, whose web processes give up on a model without a worker after 1 s."""
    with Cluster(redis_server, TRIPOD_NO_WORKER_WAIT="1") as cluster:
        yield cluster


async def stream_chat(url: str, body: dict, on_first_delta=None) -> dict:
    """Stream one chat completion; return its text, finish reason, usage, error and timings."""
    result = {"text": "", "finish_reason": None, "usage": None, "error": None, "ended_at": None}
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream(
            "POST",
            url + "/v1/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        ) as response:
            if response.status_code != 200:
                result["error"] = json.loads(await response.aread())["error"]
                result["status"] = response.status_code
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if "error" in payload:
                    result["error"] = payload["error"]
                    result["ended_at"] = time.monotonic()
                    continue
                if payload.get("usage"):
                    result["usage"] = payload["usage"]
                for choice in payload["choices"]:
                    if choice["delta"].get("content"):
                        if not result["text"] and on_first_delta is not None:
                            on_first_delta()
                        result["text"] += choice["delta"]["content"]
                    if choice["finish_reason"]:
                        result["finish_reason"] = choice["finish_reason"]
    result["ended_at"] = time.monotonic()
    return result


async def ws_stream_chat(ws_url: str, body: dict, on_first_delta=None) -> dict:
    """The same as ``stream_chat``, over a WebSocket of its own: one ``chat`` frame, read to its last frame."""
    result = {"text": "", "finish_reason": None, "usage": None, "error": None, "ended_at": None}
    async with websockets.connect(ws_url + "/ws/chat/", open_timeout=30, max_size=None) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "r", **body}))
        async for raw in ws:
            frame = json.loads(raw)
            assert frame.get("id") == "r", frame
            if frame["type"] == "delta":
                if not result["text"] and on_first_delta is not None:
                    on_first_delta()
                result["text"] += frame["text"]
            elif frame["type"] == "done":
                result["finish_reason"], result["usage"] = frame["finish_reason"], frame["usage"]
                break
            elif frame["type"] == "error":
                result["error"] = frame["error"]
                break
    result["ended_at"] = time.monotonic()
    return result


def chat_over(transport: str, web: LiveServer, body: dict, on_first_delta=None):
    """One streamed chat over SSE or over a WebSocket, with the same result shape."""
    if transport == "ws":
        return ws_stream_chat(web.ws_url, body, on_first_delta)
    return stream_chat(web.url, body, on_first_delta)


TRANSPORTS = pytest.mark.parametrize("transport", ["sse", "ws"])


async def wait_until(predicate, timeout: float = 30, interval: float = 0.05) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not reached")
        await asyncio.sleep(interval)
    return time.monotonic() - started


def test_models_readyz_and_no_worker(cluster):
    web = cluster.web()
    ready = httpx.get(web.url + "/readyz")
    assert ready.status_code == 503
    assert ready.json()["missing"] == ["workers"]
    assert httpx.get(web.url + "/v1/models").json()["data"] == []
    started = time.monotonic()
    response = httpx.post(web.url + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=30)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_worker_available"
    assert time.monotonic() - started < 5, "a model without a worker fails within a bounded time"

    cluster.worker("--slots", "2")
    assert httpx.get(web.url + "/readyz").json()["status"] == "ready"
    assert [m["id"] for m in httpx.get(web.url + "/v1/models").json()["data"]] == ["tiny"]
    response = httpx.post(web.url + "/v1/chat/completions", json=chat_body(max_tokens=3), timeout=30)
    assert response.json()["usage"]["completion_tokens"] == 3
    other = httpx.post(web.url + "/v1/chat/completions", json={**chat_body(), "model": "never-served"}, timeout=30)
    assert other.status_code == 404


@TRANSPORTS
async def test_kill_9_mid_stream_fails_its_clients_fast_and_loses_no_queued_job(cluster, transport):
    # The queued job waits for the survivor's 1500 tokens: longer than the default 60 s on a loaded machine.
    web = cluster.web(TRIPOD_QUEUE_TIMEOUT="300")
    worker_a = cluster.worker("--slots", "1")
    worker_b = cluster.worker("--slots", "1")
    first_delta = {"n": 0}

    def seen() -> None:
        first_delta["n"] += 1

    long_streams = [asyncio.create_task(chat_over(transport, web, chat_body(**LONG), seen)) for _ in range(2)]
    await wait_until(lambda: first_delta["n"] == 2)
    # Both slots are busy, so this one waits in Redis, not in any worker.
    queued = asyncio.create_task(chat_over(transport, web, chat_body(max_tokens=7)))
    await asyncio.sleep(0.3)
    killed_at = time.monotonic()
    worker_a.process.kill()
    results = await asyncio.gather(*long_streams)
    lost = [r for r in results if r["error"]]
    assert len(lost) == 1, results
    assert lost[0]["error"]["code"] == "worker_lost"
    recovery = lost[0]["ended_at"] - killed_at
    assert recovery < 5, f"the client heard about the dead worker after {recovery:.2f} s"
    survivor = [r for r in results if not r["error"]][0]
    assert survivor["finish_reason"] == "length" and survivor["usage"]["completion_tokens"] == LONG["max_tokens"]
    served = await queued
    assert served["error"] is None and served["usage"]["completion_tokens"] == 7
    print(f"\nkill -9 recovery ({transport}): client told after {recovery:.2f} s")
    assert worker_b.alive()


@TRANSPORTS
async def test_sigterm_finishes_jobs_in_flight_then_exits(cluster, transport):
    # Long enough for the queued request to wait through the gap between the two workers.
    web = cluster.web(TRIPOD_NO_WORKER_WAIT="30")
    worker = cluster.worker("--slots", "1", "--drain-timeout", "60")
    started = {"n": 0}
    in_flight = asyncio.create_task(
        chat_over(transport, web, chat_body(max_tokens=600, ignore_eos=True), lambda: started.__setitem__("n", 1))
    )
    await wait_until(lambda: started["n"] == 1)
    queued = asyncio.create_task(chat_over(transport, web, chat_body(max_tokens=4)))
    await asyncio.sleep(0.3)
    worker.signal(signal.SIGTERM)
    result = await in_flight
    assert result["error"] is None
    assert result["finish_reason"] == "length" and result["usage"]["completion_tokens"] == 600
    await wait_until(lambda: not worker.alive(), timeout=15)
    assert worker.process.returncode == 0
    # The job it had not taken is still in Redis: the next worker serves it.
    assert not queued.done()
    cluster.worker("--slots", "1")
    served = await queued
    assert served["error"] is None and served["usage"]["completion_tokens"] == 4


@TRANSPORTS
async def test_sigterm_drain_timeout_bounds_the_wait(cluster, transport):
    web = cluster.web()
    worker = cluster.worker("--slots", "1", "--drain-timeout", "0.5")
    started = {"n": 0}
    in_flight = asyncio.create_task(
        chat_over(transport, web, chat_body(max_tokens=1900, ignore_eos=True), lambda: started.__setitem__("n", 1))
    )
    await wait_until(lambda: started["n"] == 1)
    worker.signal(signal.SIGTERM)
    exit_time = await wait_until(lambda: not worker.alive(), timeout=15)
    result = await in_flight
    assert result["error"]["code"] == "worker_shutdown"
    assert exit_time < 5
    assert worker.process.returncode == 0


async def test_redis_restart_fails_fast_then_recovers_without_restarting_anything(cluster):
    web = cluster.web()
    worker = cluster.worker("--slots", "2")
    assert httpx.post(web.url + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=30).status_code == 200
    cluster.redis.kill()
    started = time.monotonic()
    during = httpx.post(web.url + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=30)
    assert during.status_code == 503, during.text
    assert during.json()["error"]["code"] == "channel_layer_unavailable"
    assert time.monotonic() - started < 3, "requests during the outage fail fast"
    assert httpx.get(web.url + "/readyz").status_code == 503
    cluster.redis.start()
    back = time.monotonic()
    while True:
        response = httpx.post(web.url + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=30)
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text  # retryable, never a 500
        assert time.monotonic() - back < 10, response.text
        await asyncio.sleep(0.2)
    recovery = time.monotonic() - back
    print(f"\nRedis restart: serving again {recovery:.2f} s after Redis came back")
    assert worker.alive() and web.alive()
    streamed = await stream_chat(web.url, chat_body(max_tokens=5))
    assert streamed["usage"]["completion_tokens"] == 5


async def test_two_web_processes_two_workers_40_streams_over_sse_and_websockets_all_served_once(cluster):
    # 20 jobs queue for each 1-slot worker: on a loaded machine the last waits longer than the default 60 s.
    webs = [cluster.web(TRIPOD_QUEUE_TIMEOUT="300") for _ in range(2)]
    workers = [cluster.worker("--slots", "1") for _ in range(2)]
    bodies = [chat_body(f"request {i}", max_tokens=12, ignore_eos=True) for i in range(40)]
    # Each web process gets SSE and WebSocket clients, half each.
    results = await asyncio.gather(
        *(chat_over(("sse", "ws")[i // 2 % 2], webs[i % 2], body) for i, body in enumerate(bodies))
    )
    assert all(r["error"] is None for r in results), [r["error"] for r in results if r["error"]]
    assert all(r["usage"]["completion_tokens"] == 12 for r in results)
    await asyncio.sleep(0.2)
    job_lines = [line for w in workers for line in w.finished_jobs()]
    job_ids = [line.split("job ", 1)[1].split(" ", 1)[0] for line in job_lines]
    assert len(job_ids) == 40 and len(set(job_ids)) == 40, "every job ran exactly once"
    assert all(w.finished_jobs() for w in workers), "both workers took a share"


@TRANSPORTS
async def test_a_client_that_leaves_cancels_the_job_on_its_worker(cluster, transport):
    web = cluster.web()
    worker = cluster.worker("--slots", "1")
    body = chat_body(max_tokens=1900, ignore_eos=True)
    if transport == "ws":
        async with websockets.connect(web.ws_url + "/ws/chat/", open_timeout=30) as ws:
            await ws.send(json.dumps({"type": "chat", "id": "leaving", **body}))
            while json.loads(await ws.recv())["type"] != "delta":
                pass
    else:
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream(
                "POST", web.url + "/v1/chat/completions", json={**body, "stream": True}
            ) as response:
                async for line in response.aiter_lines():
                    if '"content"' in line:
                        break
    left_at = time.monotonic()
    await wait_until(lambda: worker.finished_jobs(), timeout=10)
    took = time.monotonic() - left_at
    line = worker.finished_jobs()[0]
    assert "finish_reason=cancelled" in line
    tokens = int(re.search(r"completion_tokens=(\d+)", line).group(1))
    assert tokens < 1900
    print(f"\nremote cancel ({transport}): worker stopped {took:.2f} s after the client left, at {tokens} tokens")


@TRANSPORTS
async def test_a_web_process_killed_mid_stream_has_its_jobs_stopped_by_the_worker(cluster, transport):
    web = cluster.web(**BEATS)
    worker = cluster.worker("--slots", "1", **BEATS)
    first_delta = asyncio.Event()
    body = chat_body(max_tokens=1900, ignore_eos=True)
    client = asyncio.create_task(chat_over(transport, web, body, first_delta.set))
    await asyncio.wait_for(first_delta.wait(), 30)
    web.process.kill()  # SIGKILL: the web process cannot cancel anything; only its heartbeat stops
    killed_at = time.monotonic()
    with pytest.raises((httpx.HTTPError, websockets.ConnectionClosedError)):
        await client
    await wait_until(lambda: worker.finished_jobs(), timeout=20)
    took = time.monotonic() - killed_at
    line = worker.finished_jobs()[0]
    assert "finish_reason=cancelled" in line and "stopped beating" in worker.output()
    tokens = int(re.search(r"completion_tokens=(\d+)", line).group(1))
    assert tokens < 1900
    print(f"\ndead web process: its worker stopped the job {took:.2f} s after the kill, at {tokens} tokens")


async def test_200_concurrent_streams_over_sse_and_websockets_on_one_web_process(cluster):
    # 200 requests queue for 32 slots: on two cores the last wave starts after more than the default 60 s that a
    # request may wait for a worker, now that the web process submits all 200 at once (it once took seconds to
    # give each request its thread).
    web = cluster.web(TRIPOD_QUEUE_TIMEOUT="300")
    cluster.worker("--slots", "32")
    limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        response = await client.post(
            web.url + "/v1/chat/completions", json=chat_body(f"n{i}", max_tokens=16, ignore_eos=True, stream=True)
        )
        frames = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        errors = [frame for frame in frames[:-1] if "error" in json.loads(frame)]
        return {"status": response.status_code, "last": frames[-1] if frames else None, "errors": errors}

    async def one_ws(i: int) -> dict:
        result = await ws_stream_chat(web.ws_url, chat_body(f"n{i}", max_tokens=16, ignore_eos=True))
        ok = result["error"] is None and result["usage"]["completion_tokens"] == 16
        return {"status": 200, "last": "[DONE]", "errors": []} if ok else result

    # Half of them over SSE, half over a WebSocket each.
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        results = await asyncio.gather(*(one(client, i) if i % 2 else one_ws(i) for i in range(200)))
    failed = [r for r in results if r.get("status") != 200 or r.get("last") != "[DONE]" or r.get("errors")]
    assert not failed, failed[:3]
    assert "ChannelFull" not in web.output()


class _Stream:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Registry:
    """Stands in for Redis's answers about web processes: ``answers`` in turn, then the last one again."""

    def __init__(self, *answers: set[str]) -> None:
        self.answers = list(answers)

    async def live_webs(self, web_ids: set[str]) -> set[str]:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.mark.parametrize(
    ("answers", "stopped"),
    [
        ([set(), {"web-a"}], False),  # a restarted Redis forgot the key once: the job goes on
        ([set(), set()], True),  # missing at two checks in a row: the web process is gone
    ],
)
async def test_a_web_process_must_be_missing_twice_before_its_jobs_stop(answers, stopped):
    from asgi_worker.report import watch_readers
    from asgi_worker.run import Runs

    runs = Runs()
    stream = _Stream()
    runs.running["job"], runs.readers["job"] = stream, "web-a"
    watcher = asyncio.create_task(watch_readers(_Registry(*answers), runs, 0.01))
    await asyncio.sleep(0.1)
    watcher.cancel()
    assert stream.cancelled is stopped


async def test_pooled_redis_connections_survive_a_redis_restart(redis_server):
    """A restarted Redis leaves a dead socket in every pool; the first command on one must still succeed.

    Before the retry, the first command after the restart failed. In a running deployment that command was a
    worker's claim (its client got a 500) or a worker's first event to a client (lost: the client waited for
    the queue timeout).
    """
    from channels_redis.core import RedisChannelLayer

    from tripod.patches.redis_connections import redis_channel_layer
    from tripod.registry import WorkerRegistry

    layer = RedisChannelLayer(**redis_channel_layer(redis_server.url, queue_timeout=60)["CONFIG"])
    registry = WorkerRegistry(redis_server.url, ttl=5)
    await layer.send("tripod.test", {"type": "before"})
    assert (await layer.receive("tripod.test"))["type"] == "before"
    assert await registry.claim("job-1", "worker-a")
    await layer.wait_received()
    redis_server.restart()  # synchronous: the event loop has not seen any pooled socket close
    await layer.send("tripod.test", {"type": "after"})
    assert (await layer.receive("tripod.test"))["type"] == "after"
    assert await registry.claim("job-2", "worker-a")
    await layer.wait_received()


class _RedisDownRegistry:
    """Stands in for a registry whose Redis fails under the claim."""

    async def claim(self, job_id: str, worker_id: str) -> bool:
        raise redis.exceptions.ConnectionError("Connection closed by server.")


async def test_a_claim_that_redis_fails_answers_503_not_an_engine_error():
    from asgi_worker.loop import Worker
    from asgi_worker.serve import serve
    from tripod import job_protocol as wire
    from tripod.patches.inmemory_layer import LocalChannelLayer
    from tripod.protocol import SamplingParams

    layer = LocalChannelLayer()
    worker = Worker(layer, "tripod.generate.t", lambda: None, 1, registry=_RedisDownRegistry())
    reply = await layer.new_channel("tripod.reply.")
    job = wire.Job("job-1", reply, "t", SamplingParams(), time.time() + 60, prompt="hi")
    await serve(worker, wire.encode(job))
    event = await layer.receive(reply)
    assert event["type"] == wire.Error.TYPE
    assert (event["status"], event["code"]) == (503, "channel_layer_unavailable"), event
