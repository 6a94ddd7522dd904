"""Workers that stop without dying (``SIGSTOP``, a stalled host), and the job claims that decide who runs a job.

Real processes throughout: a private ``redis-server``, daphne and ``python -m asgi_worker``, paused with
``SIGSTOP`` and resumed with ``SIGCONT``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import time

import httpx
import pytest
import redis as redis_client

from tests.conftest import chat_body
from tests.processes import LiveServer, WorkerProcess
from tests.test_scaleout import BEATS, stream_chat, wait_until

# Above the channel layer's 10 s read timeout: the job a paused worker took is dropped when it resumes.
PAUSE_SECONDS = 11


def generations(web: LiveServer) -> list[dict]:
    """The web process's request log: one JSON line per generation."""
    lines = [json.loads(line) for line in web.output().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "generation"]


async def post_chat(url: str, content: str, max_tokens: int = 4) -> dict:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(url + "/v1/chat/completions", json=chat_body(content, max_tokens=max_tokens))
    return {"status": response.status_code, "body": response.json(), "seconds": time.monotonic() - started}


async def block_afresh(web: LiveServer, worker: WorkerProcess) -> None:
    """Return just after ``worker`` began a new blocking read of its job channel (channels_redis reads for 5 s).

    Idle workers are handed jobs in turn, so of two one-by-one requests ``worker`` serves one; it reads again right
    after.
    """
    for i in range(6):
        served = len(worker.finished_jobs())
        assert (await post_chat(web.url, f"warm {i}", max_tokens=1))["status"] == 200
        try:
            await wait_until(lambda served=served: len(worker.finished_jobs()) > served, timeout=1)
        except AssertionError:
            continue
        await asyncio.sleep(0.3)
        return
    pytest.fail("the worker served none of 6 requests")


async def test_a_job_taken_by_a_paused_idle_worker_is_served_by_the_other(cluster):
    """An idle worker stopped during its blocking read is handed a job by Redis; the job must not wait for it.

    Before: that job was dropped when the worker resumed (its read had timed out), and its client got a 503 after
    the whole queue timeout. Now the web process sees that the job left the queue and nobody claimed it, and sends
    it again; the claim lets one worker run it.
    """
    web = cluster.web(TRIPOD_QUEUE_TIMEOUT="30", TRIPOD_NO_WORKER_WAIT="30", **BEATS)
    paused = cluster.worker("--slots", "1", **BEATS)
    cluster.worker("--slots", "1", **BEATS)
    for attempt in range(3):
        await block_afresh(web, paused)
        paused.signal(signal.SIGSTOP)
        before = len(paused.finished_jobs())
        # Redis hands each job to the reader that has waited longest: one of these goes to the paused worker.
        requests = [asyncio.create_task(post_chat(web.url, f"attempt {attempt} request {i}")) for i in range(4)]
        await asyncio.sleep(PAUSE_SECONDS)
        paused.signal(signal.SIGCONT)
        results = await asyncio.gather(*requests)
        assert [r["status"] for r in results] == [200] * 4, [r["body"] for r in results]
        await asyncio.sleep(1)  # the resumed worker may read the job it took: it must not run it
        assert len(paused.finished_jobs()) == before, "the paused worker ran nothing after it resumed"
        sent_again = re.findall(r"job (\w+): taken by a worker that stopped", web.output())
        if sent_again:
            break
    else:
        pytest.fail("the paused worker never took a job")
    served = {line["job_id"]: line for line in generations(web)}
    for job_id in sent_again:
        assert served[job_id]["status"] == "ok" and f"-{paused.pid}-" not in served[job_id]["worker"]
    waits = sorted(round(r["seconds"], 2) for r in results)
    print(f"\npaused idle worker: the 4 clients waited {waits} s (the worker was stopped {PAUSE_SECONDS} s)")


async def test_a_resumed_worker_stops_the_jobs_its_clients_gave_up(cluster):
    """A busy worker paused long enough for its clients to hear ``worker_lost`` stops their jobs when it resumes."""
    web = cluster.web(**BEATS)
    worker = cluster.worker("--slots", "2", **BEATS)
    started = {"n": 0}

    def seen() -> None:
        started["n"] += 1

    body = chat_body(max_tokens=1900, ignore_eos=True)
    streams = [asyncio.create_task(stream_chat(web.url, body, seen)) for _ in range(2)]
    await wait_until(lambda: started["n"] == 2)
    worker.signal(signal.SIGSTOP)
    results = await asyncio.gather(*streams)
    assert [r["error"]["code"] for r in results] == ["worker_lost"] * 2, results
    worker.signal(signal.SIGCONT)
    await wait_until(lambda: len(worker.finished_jobs()) == 2, timeout=60)
    for line in worker.finished_jobs():
        assert "finish_reason=cancelled" in line, line
        assert int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 1900, line


async def test_claims_of_ended_jobs_outlive_only_the_queue_timeout(cluster):
    """One claim per job once stayed 6 hours (290 MB of Redis at 100 requests/s); now it ends with the job."""
    web = cluster.web(TRIPOD_QUEUE_TIMEOUT="20")
    cluster.worker("--slots", "2")
    results = await asyncio.gather(*(post_chat(web.url, f"request {i}", max_tokens=3) for i in range(6)))
    assert [r["status"] for r in results] == [200] * 6
    await asyncio.sleep(0.5)  # a worker ends its claim just after it sent the last event
    client = redis_client.Redis.from_url(cluster.redis.url)
    keys = list(client.scan_iter(match="tripod:claim:*"))
    assert len(keys) == 6
    for key in keys:
        assert client.get(key) == b"!ended"
        assert 0 < client.pttl(key) <= (20 + 5) * 1000


async def test_claims_decide_who_runs_a_job(redis_server):
    """The claim a worker takes, renews, loses and ends, on a real Redis."""
    from tripod import job_protocol as wire
    from tripod.registry import WorkerRegistry

    registry = WorkerRegistry(redis_server.url, ttl=1)
    client = redis_client.Redis.from_url(redis_server.url)
    for worker_id in ("worker-a", "worker-b"):
        await registry.beat(wire.WorkerBeat(worker_id, "tiny", "hf", 1, 0, None, "host", 1, draining=False))
    assert await registry.claim("job-1", "worker-a")
    assert not await registry.claim("job-1", "worker-b"), "a live worker's claim holds"
    assert 0 < client.pttl("tripod:claim:job-1") <= 10_000
    await registry.remove("worker-a")
    assert await registry.claim("job-1", "worker-b"), "a dead worker's claim is taken over"
    assert await registry.renew_claims(["job-1"], "worker-a") == ["job-1"], "the resumed worker learns it lost it"
    await registry.release("job-1", "worker-a", deadline=time.time() + 30)
    assert await registry.claim_holder("job-1") == "worker-b", "only the holder ends a claim"
    await registry.release("job-1", "worker-b", deadline=time.time() + 30)
    assert await registry.claim_holder("job-1") == "!ended"
    assert not await registry.claim("job-1", "worker-a"), "an ended job never runs again"

    assert await registry.claim("job-2", "worker-b")
    await registry.abandon("job-2", keep=60)
    assert await registry.renew_claims(["job-2"], "worker-b") == ["job-2"], "its client gave it up"
    assert not await registry.claim("job-2", "worker-a")

    assert await registry.claim("job-3", "worker-b")
    await registry.release("job-3", "worker-b", deadline=time.time() - 60)
    assert client.exists("tripod:claim:job-3") == 0, "past its deadline no copy can start: no key at all"


async def test_the_registry_reads_each_heartbeat_as_a_worker_beat(redis_server):
    """Beats decode into ``WorkerBeat``: one written before the record had a ``type`` too, one that is not a beat
    is skipped (not a 500 on every request that asks for the live models)."""
    from tripod import job_protocol as wire
    from tripod.registry import WorkerRegistry

    registry = WorkerRegistry(redis_server.url, ttl=5)
    client = redis_client.Redis.from_url(redis_server.url)
    beat = wire.WorkerBeat("worker-a", "tiny", "hf", 4, 1, "tripod.worker.a", "host", 7, draining=True)
    await registry.beat(beat)
    older = dataclasses.replace(beat, id="worker-b", model="other")
    record = wire.encode(older)
    del record["type"]
    client.set("tripod:worker:worker-b", json.dumps(record), px=5000)
    client.set("tripod:worker:worker-c", json.dumps({"id": "worker-c"}), px=5000)
    assert sorted(await registry.workers(), key=lambda worker: worker.id) == [beat, older]
    assert await registry.live_models() == {"tiny", "other"}
    assert await registry.alive("worker-b") and not await registry.alive("worker-c")
