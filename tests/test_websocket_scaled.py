"""WebSocket clients in a scaled deployment (real redis-server, daphne and ``python -m asgi_worker`` processes).

An idle socket once held channels_redis's receive lock on its own channel, so no reply of its web process was
read again: every request there waited out the queue timeout. These tests keep sockets open beside REST, SSE,
resumable streams and other sockets, and revoke a key under an open socket.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from tests.conftest import chat_body
from tests.processes import create_key, manage, migrated_database


async def ws_chat(ws_url: str, body: dict, headers: dict | None = None) -> dict:
    """One chat over its own socket; the finish reason, usage or error of its last frame."""
    async with websockets.connect(ws_url + "/ws/chat/", open_timeout=10, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "1", **body}))
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] in ("done", "error"):
                return frame
    raise AssertionError("the socket closed without a done frame")


async def test_channels_of_every_prefix_share_one_reader(redis_server):
    """The layer itself: a receive pending on one local channel does not keep messages of another from arriving."""
    from tripod.patches.redis_connections import OneKeyRedisChannelLayer, redis_channel_layer

    layer = OneKeyRedisChannelLayer(**redis_channel_layer(redis_server.url, queue_timeout=60)["CONFIG"])
    idle = asyncio.ensure_future(layer.receive(await layer.new_channel()))  # what a Channels consumer gets
    await asyncio.sleep(0.2)
    reply = await layer.new_channel("tripod.reply.")
    assert len(reply) < layer.MAX_NAME_LENGTH
    await layer.send(reply, {"type": "generate.delta", "text": "a"})
    assert (await asyncio.wait_for(layer.receive(reply), 3))["text"] == "a"
    idle.cancel()
    await asyncio.gather(idle, return_exceptions=True)


async def test_the_layer_holds_more_blocking_receives_than_redis_pys_default_pool(redis_server):
    """150 receives pending at once, each on a pooled connection: redis-py 8's plain pool refused the 101st."""
    from tripod.patches.redis_connections import OneKeyRedisChannelLayer, redis_channel_layer

    layer = OneKeyRedisChannelLayer(**redis_channel_layer(redis_server.url, queue_timeout=60)["CONFIG"])
    names = [f"tripod.test.pool{i}" for i in range(150)]
    receives = [asyncio.ensure_future(layer.receive(name)) for name in names]
    await asyncio.sleep(0.5)  # every receive holds its connection in a blocking pop now
    await asyncio.gather(*(layer.send(name, {"type": "x", "name": name}) for name in names))
    got = await asyncio.wait_for(asyncio.gather(*receives), 20)
    assert [message["name"] for message in got] == names


@pytest.fixture
def deployment(cluster):
    webs, _ = cluster.start(webs=2, worker=["--slots", "8"], TRIPOD_QUEUE_TIMEOUT="15")
    return webs


async def test_idle_sockets_leave_every_transport_served_on_two_web_processes(deployment):
    idle = [await websockets.connect(web.ws_url + "/ws/chat/", open_timeout=10) for web in deployment for _ in range(3)]
    await asyncio.sleep(0.5)  # the idle sockets' receives are pending now
    started = time.monotonic()

    async def rest(web) -> dict:
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(web.url + "/v1/chat/completions", json=chat_body(max_tokens=5))
        return {"status": response.status_code, "body": response.json()}

    async def sse(web) -> str:
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(web.url + "/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
        return response.text

    async def stream(web) -> str:
        async with httpx.AsyncClient(timeout=60) as client:
            created = (await client.post(web.url + "/v1/streams", json=chat_body(max_tokens=5))).json()
            return (await client.get(web.url + created["url"])).text

    jobs = []
    for web in deployment:
        jobs += [rest(web), sse(web), stream(web), ws_chat(web.ws_url, chat_body(max_tokens=5))]
    results = await asyncio.gather(*jobs)
    slowest = time.monotonic() - started
    for i in range(0, len(results), 4):
        served_rest, served_sse, served_stream, served_ws = results[i : i + 4]
        assert served_rest["status"] == 200, served_rest
        assert served_rest["body"]["usage"]["completion_tokens"] == 5
        assert served_sse.rstrip().endswith("data: [DONE]") and '"error"' not in served_sse, served_sse
        assert "[DONE]" in served_stream and '"error"' not in served_stream, served_stream
        assert served_ws["type"] == "done" and served_ws["usage"]["completion_tokens"] == 5, served_ws
    # The idle sockets are still usable.
    for ws in idle:
        await ws.send(json.dumps({"type": "chat", "id": "late", **chat_body(max_tokens=2)}))
    for ws in idle:
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] not in ("done", "error"):
            pass
        assert frame["type"] == "done", frame
        await ws.close()
    print(f"\n8 requests beside 6 idle sockets on 2 web processes: all served, slowest {slowest:.2f} s")


async def test_a_key_revoked_under_an_open_socket_stops_working_and_closes_it(cluster):
    db = migrated_database()
    key = create_key(db, "alice")
    create_key(db, "bob")  # another key stays active: with none left, the server would be open
    (web,), _ = cluster.start(webs=1, worker=["--slots", "4"], TRIPOD_DB_PATH=db, TRIPOD_AUTH_CACHE_SECONDS="0.5")
    auth = {"Authorization": f"Bearer {key}"}
    async with websockets.connect(web.ws_url + "/ws/chat/", open_timeout=10, additional_headers=auth) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "before", **chat_body(max_tokens=2)}))
        while (frame := json.loads(await ws.recv()))["type"] not in ("done", "error"):
            pass
        assert frame["type"] == "done", frame
        assert manage(web.db_path, "tripod_keys", "revoke", "alice").returncode == 0
        await asyncio.sleep(1)  # the key cache's lifetime
        await ws.send(json.dumps({"type": "chat", "id": "after", **chat_body(max_tokens=2)}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert frame["type"] == "error" and frame["id"] == "after", frame
        assert frame["error"]["code"] == "invalid_api_key"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd.code == 4401
    rest = httpx.post(web.url + "/v1/chat/completions", json=chat_body(max_tokens=2), headers=auth, timeout=30)
    assert rest.status_code == 401
