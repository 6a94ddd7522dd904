"""Tokens per minute on a real daphne: every token a request may use is reserved at admission, then settled.

No 60-second window may hold more than a key's ``--tpm``: not by a burst of concurrent requests, not by one
request with a large ``max_tokens``, not by one with none, and not across two web processes sharing Redis.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from tests.conftest import chat_body
from tests.processes import LiveServer, create_key, migrated_database

URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def limited():
    """An embedded server with keys whose only limit is tokens per minute, one key per test."""
    server = LiveServer({"TRIPOD_AUTH_CACHE_SECONDS": "0"})
    keys = {
        name: create_key(server.db_path, name, "--tpm", tpm)
        for name, tpm in [("burst", "200"), ("large", "200"), ("socket", "200"), ("returned", "1000")]
    }
    server.wait_ready()
    try:
        yield server, keys
    finally:
        server.stop()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def used_tokens(server: LiveServer, key: str) -> int:
    """The key's prompt + completion tokens recorded today (every request that reached a worker)."""
    data = httpx.get(server.url + "/v1/usage", headers=auth(key), timeout=30).json()["data"]
    return sum(day["total_tokens"] for day in data)


async def until_admitted(client: httpx.AsyncClient, server: LiveServer, key: str, body: dict) -> httpx.Response:
    """Send ``body`` until it is served: a job left by its client settles in the background, within seconds."""
    deadline = time.monotonic() + 30
    while True:
        response = await client.post(server.url + URL, json=body, headers=auth(key))
        if response.status_code != 429 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return response
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        await asyncio.sleep(0.5)


async def burst(urls: list[str], key: str, count: int = 20, max_tokens: int = 10) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(
            *(
                client.post(urls[i % len(urls)] + URL, json=chat_body(max_tokens=max_tokens), headers=auth(key))
                for i in range(count)
            )
        )


def check_burst(responses: list[httpx.Response], limit: int) -> int:
    """The admitted requests used at most ``limit`` tokens, the others got a 429; returns the admitted tokens."""
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)]
    admitted = sum(r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200)
    assert 200 in statuses and 429 in statuses, statuses
    assert admitted <= limit, (admitted, statuses)
    for refused in (r for r in responses if r.status_code == 429):
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert "tokens per minute" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
    return admitted


async def test_concurrent_requests_never_exceed_the_tokens_per_minute(limited):
    server, keys = limited
    responses = await burst([server.url], keys["burst"])
    admitted = check_burst(responses, 200)
    # Nothing refused reached a worker: the key's recorded usage is exactly what was admitted.
    assert used_tokens(server, keys["burst"]) == admitted


async def test_a_request_that_can_never_fit_is_refused(limited):
    server, keys = limited
    key = keys["large"]
    async with httpx.AsyncClient(timeout=120) as client:
        large = await client.post(server.url + URL, json=chat_body(max_tokens=1500), headers=auth(key))
        assert large.status_code == 429, large.text
        assert large.json()["error"]["code"] == "rate_limit_exceeded"
        assert "can never fit" in large.json()["error"]["message"]
        assert used_tokens(server, key) == 0  # refused before any worker saw it
        # No max_tokens: the rest of the context window (2,048 tokens for tiny with the prompt) is reserved as
        # soon as the worker has counted the prompt, and cannot fit either.
        open_ended = await client.post(server.url + URL, json=chat_body(ignore_eos=False), headers=auth(key))
        assert open_ended.status_code == 429, open_ended.text
        assert "can never fit" in open_ended.json()["error"]["message"]
        # What the refused job had spent (its prompt, a token) is settled; then a request that fits is served.
        await until_admitted(client, server, key, chat_body(max_tokens=5))
    assert used_tokens(server, key) <= 200


async def test_the_websocket_reserves_the_same_way(limited):
    server, keys = limited
    async with websockets.connect(server.ws_url + "/ws/chat/", additional_headers=auth(keys["socket"])) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "big", **chat_body(max_tokens=1500)}))
        frame = json.loads(await ws.recv())
        assert frame["type"] == "error" and frame["id"] == "big"
        assert frame["error"]["code"] == "rate_limit_exceeded"


async def test_a_running_request_holds_its_reservation_and_settles_to_its_exact_usage(limited):
    server, keys = limited
    key = keys["returned"]
    body = chat_body(max_tokens=900, ignore_eos=True, stream=True)
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", server.url + URL, json=body, headers=auth(key)) as stream:
            assert stream.status_code == 200
            # Read to the first text, holding on to the line iterator: a generator left by ``break`` may be
            # finalized at once, which closes the response, and the client would have left already.
            lines = stream.aiter_lines()
            while '"content"' not in await anext(lines):
                pass
            # Running, it holds 18 + 900 of the 1,000 tokens: another 118 cannot fit beside it.
            beside = await client.post(server.url + URL, json=chat_body(max_tokens=100), headers=auth(key))
            assert beside.status_code == 429, beside.text
            assert beside.json()["error"]["code"] == "rate_limit_exceeded"
            await lines.aclose()
        # The client left: the stream settles to the tokens it used, far fewer than 900, and the rest is free again.
        after = await until_admitted(client, server, key, chat_body(max_tokens=100))
    assert used_tokens(server, key) < 18 + 900 + after.json()["usage"]["total_tokens"]


async def test_two_web_processes_sharing_redis_keep_the_same_bound(cluster):
    db = migrated_database()
    key = create_key(db, "shared", "--tpm", "200")
    webs, _ = cluster.start(webs=2, worker=["--slots", "8"], TRIPOD_DB_PATH=db, TRIPOD_AUTH_CACHE_SECONDS="0")
    responses = await burst([web.url for web in webs], key)
    admitted = check_burst(responses, 200)
    assert used_tokens(webs[0], key) == admitted


def test_a_request_of_n_choices_reserves_each_choices_budget():
    from tripod.accounts.ratelimit import reservation
    from tripod.protocol import parse_chat_request

    one = parse_chat_request(chat_body(max_tokens=50), max_messages=8)
    three = parse_chat_request(chat_body(max_tokens=50, n=3), max_messages=8)
    (reserve_one, least_one), (reserve_three, least_three) = reservation(one), reservation(three)
    assert reserve_three - reserve_one == 2 * 50  # the prompt counts once
    assert least_three == 3 * least_one
