"""Access control on a real daphne: keys on every route and transport, limits, usage, no key in logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time

import httpx
import openai
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.conftest import chat_body
from tests.processes import LiveServer, create_key, manage, migrated_database

WRONG = "tpd_this-is-not-a-key-0000000000000000000000000"
ENV_KEY = "sk-single-env-key-for-the-seed"


@pytest.fixture(scope="module")
def secured():
    """A server with stored keys, the seed's API_KEY, tight limits, and debug logging."""
    env = {
        "API_KEY": ENV_KEY,
        "TRIPOD_AUTH_CACHE_SECONDS": "0",
        "TRIPOD_LOG_LEVEL": "DEBUG",
        "TRIPOD_MAX_TOKENS_CAP": "50",
        "TRIPOD_MAX_PROMPT_TOKENS": "300",
        "TRIPOD_WS_MAX_FRAME_BYTES": "4000",
    }
    with LiveServer(env) as server:
        keys = {
            "good": create_key(server.db_path, "good"),
            "revoked": create_key(server.db_path, "revoked"),
            "streams": create_key(server.db_path, "streams", "--max-streams", "1"),
            "tokens": create_key(server.db_path, "tokens", "--tpm", "50"),
        }
        assert manage(server.db_path, "tripod_keys", "revoke", "revoked").returncode == 0
        yield server.wait_ready(), keys


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


ROUTES = [
    ("POST", "/v1/chat/completions", chat_body(max_tokens=2)),
    ("POST", "/v1/chat/completions", chat_body(max_tokens=2, stream=True)),
    ("POST", "/api/chat/completions", chat_body(max_tokens=2)),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
    ("GET", "/v1/usage", None),
    ("POST", "/v1/streams", chat_body(max_tokens=2)),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize("who", ["none", "wrong", "revoked", "good", "env"])
def test_auth_matrix_over_http(secured, method, path, body, who):
    server, keys = secured
    key = {"none": None, "wrong": WRONG, "revoked": keys["revoked"], "good": keys["good"], "env": ENV_KEY}[who]
    response = httpx.request(method, server.url + path, json=body, headers=headers(key), timeout=60)
    if who in ("none", "wrong", "revoked"):
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and set(error) == {"message", "type", "param", "code"}
        assert response.headers["www-authenticate"].startswith("Bearer")
    elif path == "/v1/usage" and who == "env":
        assert response.status_code == 404  # usage is kept per stored key
    else:
        assert response.status_code == (201 if path == "/v1/streams" else 200), response.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints_need_no_key(secured, path):
    server, _ = secured
    assert httpx.get(server.url + path, timeout=30).status_code in (200, 503)
    assert httpx.get(server.url + path, timeout=30).status_code != 401


async def ws_chat(url: str, **connect) -> dict:
    async with websockets.connect(url + "/ws/chat/", open_timeout=10, **connect) as ws:
        await ws.send(json.dumps({"type": "chat", "id": 1, **chat_body(max_tokens=2)}))
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] in ("done", "error"):
                return frame


@pytest.mark.parametrize("who", ["none", "wrong", "revoked", "good", "env"])
@pytest.mark.parametrize("via", ["header", "subprotocol"])
async def test_auth_matrix_over_websocket(secured, who, via):
    server, keys = secured
    key = {"none": None, "wrong": WRONG, "revoked": keys["revoked"], "good": keys["good"], "env": ENV_KEY}[who]
    connect = {}
    if key and via == "header":
        connect["additional_headers"] = headers(key)
    if via == "subprotocol":
        connect["subprotocols"] = ["tripod"] + ([f"bearer.{key}"] if key else [])
    if who in ("none", "wrong", "revoked"):
        with pytest.raises(InvalidStatus) as info:
            await ws_chat(server.ws_url, **connect)
        assert info.value.response.status_code == 403
    else:
        frame = await ws_chat(server.ws_url, **connect)
        assert frame["type"] == "done" and frame["usage"]["completion_tokens"] == 2


def test_openai_sdk_with_a_key(secured):
    server, keys = secured
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=keys["good"], max_retries=0)
    assert client.chat.completions.create(model="tiny", messages=chat_body()["messages"], max_tokens=3).usage
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key=WRONG, max_retries=0).models.list()


def test_usage_counts_exact_tokens_for_the_calling_key(secured):
    server, _ = secured
    key = create_key(server.db_path, "usage-probe")
    answers = [
        httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=n), headers=headers(key), timeout=60)
        for n in (3, 5)
    ]
    usage = httpx.get(server.url + "/v1/usage", headers=headers(key)).json()
    assert usage["key"] == "usage-probe"
    (today,) = usage["data"]
    assert today["requests"] == 2
    assert today["completion_tokens"] == 8
    assert today["prompt_tokens"] == sum(a.json()["usage"]["prompt_tokens"] for a in answers)


async def test_concurrent_generation_limit(secured):
    server, keys = secured
    async with httpx.AsyncClient(timeout=60) as client:
        first = client.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json=chat_body(max_tokens=50, ignore_eos=True, stream=True),
            headers=headers(keys["streams"]),
        )
        async with first as streaming:
            assert streaming.status_code == 200
            second = await client.post(
                server.url + "/v1/chat/completions", json=chat_body(max_tokens=2), headers=headers(keys["streams"])
            )
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(second.headers["retry-after"]) >= 1
            await streaming.aread()
        third = await client.post(
            server.url + "/v1/chat/completions", json=chat_body(max_tokens=2), headers=headers(keys["streams"])
        )
        assert third.status_code == 200


def test_tokens_per_minute_are_settled_when_a_request_ends(secured):
    server, keys = secured
    first = httpx.post(
        server.url + "/v1/chat/completions", json=chat_body(max_tokens=20), headers=headers(keys["tokens"]), timeout=60
    )
    # 18 + 20 of the 50 tokens are spent; the next request's 18 + 2 cannot fit beside them.
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == 38
    second = httpx.post(
        server.url + "/v1/chat/completions", json=chat_body(max_tokens=2), headers=headers(keys["tokens"]), timeout=60
    )
    assert second.status_code == 429
    assert "tokens per minute" in second.json()["error"]["message"]
    assert 1 <= int(second.headers["retry-after"]) <= 60


async def test_rate_limit_on_the_websocket_is_an_error_frame_for_that_request_only(secured):
    server, keys = secured
    async with websockets.connect(server.ws_url + "/ws/chat/", additional_headers=headers(keys["streams"])) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "a", **chat_body(max_tokens=50, ignore_eos=True)}))
        await ws.send(json.dumps({"type": "chat", "id": "b", **chat_body(max_tokens=2)}))
        frames = {}
        while "a" not in frames or "b" not in frames:
            frame = json.loads(await ws.recv())
            if frame["type"] in ("done", "error"):
                frames[frame["id"]] = frame
        assert frames["b"]["type"] == "error" and frames["b"]["error"]["code"] == "rate_limit_exceeded"
        assert frames["a"]["type"] == "done"


def test_server_limits(secured):
    server, keys = secured
    auth = headers(keys["good"])
    capped = httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=51), headers=auth, timeout=60)
    assert capped.status_code == 400 and capped.json()["error"]["param"] == "max_tokens"
    open_ended = httpx.post(server.url + "/v1/chat/completions", json=chat_body(), headers=auth, timeout=60)
    assert open_ended.json()["usage"]["completion_tokens"] <= 50
    long_prompt = httpx.post(
        server.url + "/v1/chat/completions", json=chat_body("word " * 400, max_tokens=2), headers=auth, timeout=60
    )
    assert long_prompt.status_code == 400 and long_prompt.json()["error"]["code"] == "prompt_too_long"


async def test_websocket_frame_size_limit(secured):
    server, keys = secured
    async with websockets.connect(server.ws_url + "/ws/chat/", additional_headers=headers(keys["good"])) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "big", **chat_body("x" * 5000)}))
        frame = json.loads(await ws.recv())
        assert frame["type"] == "error" and frame["error"]["code"] == "frame_too_large"
        await ws.send(json.dumps({"type": "chat", "id": "ok", **chat_body(max_tokens=1)}))
        while (frame := json.loads(await ws.recv()))["type"] not in ("done", "error"):
            pass
        assert frame["type"] == "done"


def test_no_log_line_contains_a_key(secured):
    server, keys = secured
    # Exercise every path that could log: failures and successes, REST, SSE, WebSocket.
    for key in (*keys.values(), ENV_KEY, WRONG):
        httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=1), headers=headers(key), timeout=60)
        httpx.get(server.url + "/v1/models?api_key=" + key[:4], headers=headers(key), timeout=60)
        try:
            asyncio.run(ws_chat(server.ws_url, subprotocols=["tripod", f"bearer.{key}"]))
        except InvalidStatus:
            pass
    log = server.output()
    assert "DEBUG" in log, "the server logged at debug level"
    for key in (*keys.values(), ENV_KEY, WRONG):
        assert key not in log


def test_an_open_server_says_so_at_startup(server):
    assert "the server is OPEN" in server.output()


def test_key_management_command(tmp_path):
    db = migrated_database()
    key = create_key(db, "alice", "--rpm", "5", "--tpm", "1000", "--max-streams", "2")
    assert key.startswith("tpd_") and len(key) > 40
    listing = manage(db, "tripod_keys", "list").stdout
    assert "alice" in listing and "rpm=5 tpm=1000 max_streams=2" in listing and key not in listing
    assert manage(db, "tripod_keys", "create", "alice").returncode != 0
    assert manage(db, "tripod_keys", "create", "bob", "--rpm", "0").returncode != 0
    assert manage(db, "tripod_keys", "revoke", "alice").returncode == 0
    assert "revoked" in manage(db, "tripod_keys", "list").stdout
    assert manage(db, "tripod_keys", "revoke", "nobody").returncode != 0


async def test_rpm_is_exact_across_two_web_processes_sharing_redis(cluster):
    """50 concurrent requests, 2 web processes, 1 key allowed 20 per minute: exactly 20 pass."""
    db = migrated_database()
    key = create_key(db, "burst", "--rpm", "20")
    webs, _ = cluster.start(webs=2, worker=["--slots", "8"], TRIPOD_DB_PATH=db)
    async with httpx.AsyncClient(timeout=60) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    webs[i % 2].url + "/v1/chat/completions", json=chat_body(max_tokens=1), headers=headers(key)
                )
                for i in range(50)
            )
        )
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 20, statuses
    assert statuses.count(429) == 30, statuses
    limited = [r for r in responses if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in limited)
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in limited)


async def test_usage_counts_the_tokens_of_a_stream_the_client_left(secured):
    server, _ = secured
    key = create_key(server.db_path, "leaver")
    body = chat_body(max_tokens=50, ignore_eos=True, stream=True)
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers(key)) as r:
            async for line in r.aiter_lines():
                if '"content"' in line:
                    break
    for _ in range(100):
        data = httpx.get(server.url + "/v1/usage", headers=headers(key)).json()["data"]
        if data and data[0]["completion_tokens"] > 0:
            break
        await asyncio.sleep(0.1)
    assert data[0]["requests"] == 1 and 0 < data[0]["completion_tokens"] <= 50


def test_usage_counts_a_resumable_stream_that_finishes_after_its_post(secured):
    """The stream's generation outlives the POST that started it; its usage is recorded when it ends."""
    server, _ = secured
    key = create_key(server.db_path, "resumer")
    body = chat_body(max_tokens=30, ignore_eos=True)
    response = httpx.post(server.url + "/v1/streams", json=body, headers=headers(key), timeout=60)
    assert response.status_code == 201, response.text
    with httpx.stream("GET", server.url + response.json()["url"], timeout=60) as reader:
        raw = "".join(reader.iter_text())
    assert raw.rstrip().endswith("data: [DONE]")
    for _ in range(100):
        data = httpx.get(server.url + "/v1/usage", headers=headers(key)).json()["data"]
        if data and data[0]["completion_tokens"]:
            break
        time.sleep(0.1)
    assert data[0]["requests"] == 1 and data[0]["completion_tokens"] == 30


def test_websocket_clients_without_an_origin_pass_and_foreign_pages_do_not():
    server = LiveServer({"TRIPOD_ALLOWED_HOSTS": "127.0.0.1,localhost"}).wait_ready()
    try:
        assert asyncio.run(ws_chat(server.ws_url))["type"] == "done"
        with pytest.raises(InvalidStatus):
            asyncio.run(ws_chat(server.ws_url, origin="http://evil.example"))
        assert asyncio.run(ws_chat(server.ws_url, origin=f"http://127.0.0.1:{server.port}"))["type"] == "done"
    finally:
        server.stop()


async def test_key_lookups_and_usage_see_a_database_replaced_under_a_running_server():
    """A key lookup that misses the cache runs in a worker thread; Django's connection rules must hold there
    too (closed after use under the default ``CONN_MAX_AGE``). Before, each such thread kept its first
    connection for ever, so a database restored or failed over under a running server (here: its sqlite file
    replaced) went unseen by the lookups. A WebSocket's usage write must see the new database as well."""
    server = LiveServer({"TRIPOD_AUTH_CACHE_SECONDS": "0"})
    old_key = create_key(server.db_path, "before")
    server.wait_ready()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:

            async def statuses(key: str) -> list[int]:
                return [(await client.get("/v1/models", headers=headers(key))).status_code for _ in range(8)]

            assert (await ws_chat(server.ws_url, additional_headers=headers(old_key)))["type"] == "done"
            assert await statuses(old_key) == [200] * 8
            replacement = migrated_database()
            new_key = create_key(replacement, "after")
            os.replace(replacement, server.db_path)
            assert await statuses(new_key) == [200] * 8
            assert await statuses(old_key) == [401] * 8
            assert (await ws_chat(server.ws_url, additional_headers=headers(new_key)))["type"] == "done"
        with contextlib.closing(sqlite3.connect(server.db_path)) as db:
            for _ in range(50):  # the usage row is written as the request settles
                rows = db.execute("SELECT requests FROM tripod_usageday").fetchall()
                if rows:
                    break
                await asyncio.sleep(0.1)
        assert rows == [(1,)]
    finally:
        server.stop()
