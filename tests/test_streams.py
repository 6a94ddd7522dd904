"""Resumable streams (``POST /v1/streams``, then ``GET``/``DELETE`` on its signed URL) against real daphnes.

Embedded mode keeps frames in the web process; with ``REDIS_URL`` they are Redis Streams that any web
process serves, which the cross-process tests check by reading from a process the stream did not start on.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import redis

from tests.conftest import chat_body
from tests.processes import Cluster, LiveServer

LONG = {"max_tokens": 1500, "ignore_eos": True}
GREEDY = {"temperature": 0, "max_tokens": 40}


def start(url: str, body: dict, **kwargs) -> dict:
    response = httpx.post(url + "/v1/streams", json=body, timeout=60, **kwargs)
    assert response.status_code == 201, response.text
    stream = response.json()
    assert stream["object"] == "stream" and stream["url"].startswith(f"/v1/streams/{stream['id']}?token=")
    assert stream["expires_at"] > time.time()
    return stream


def parse_frames(raw: str) -> list[tuple[int | None, str]]:
    """``(id, data)`` of each event of an SSE body (comments and ``retry:`` skipped)."""
    frames = []
    for block in raw.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line and not line.startswith(":"))
        if "data" in fields:
            frames.append((int(fields["id"]) if "id" in fields else None, fields["data"]))
    return frames


def read(url: str, stream: dict, *, after: int | None = None, limit: int | None = None, **params) -> tuple[int, str]:
    """GET the stream (resuming after ``after``); stop after ``limit`` frames, as a dropped connection would."""
    headers = {"Accept": "text/event-stream"}
    if after is not None:
        headers["Last-Event-ID"] = str(after)
    raw = ""
    query = "".join(f"&{name}={value}" for name, value in params.items())
    with httpx.stream("GET", url + stream["url"] + query, headers=headers, timeout=60) as response:
        if response.status_code != 200:
            return response.status_code, response.read().decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        for text in response.iter_text():
            raw += text
            if limit is not None and len(parse_frames(raw)) >= limit:
                break
    return 200, raw


def content(frames: list[tuple[int | None, str]]) -> str:
    text = ""
    for _, data in frames:
        if data != "[DONE]":
            for choice in json.loads(data).get("choices", []):
                text += choice["delta"].get("content") or ""
    return text


def test_a_stream_is_the_same_completion_with_an_id_per_frame(server):
    reference = httpx.post(server.url + "/v1/chat/completions", json=chat_body(**GREEDY), timeout=60).json()
    stream = start(server.url, chat_body(**GREEDY, stream_options={"include_usage": True}))
    status, raw = read(server.url, stream)
    assert status == 200 and raw.startswith("retry: ")
    frames = parse_frames(raw)
    assert [frame_id for frame_id, _ in frames] == list(range(1, len(frames) + 1))
    assert frames[-1][1] == "[DONE]"
    assert content(frames) == reference["choices"][0]["message"]["content"]
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == reference["usage"]


def test_a_reader_that_drops_resumes_after_its_last_frame_with_nothing_lost_or_repeated(server):
    body = chat_body(**GREEDY)
    stream = start(server.url, body)
    _, whole = read(server.url, stream)
    expected = parse_frames(whole)
    seen: list[tuple[int | None, str]] = []
    for limit in (3, 5, 7):  # three drops, each resumed with the last id seen (as EventSource does)
        status, raw = read(server.url, stream, after=seen[-1][0] if seen else None, limit=limit)
        assert status == 200
        seen += parse_frames(raw)[:limit]
    _, rest = read(server.url, stream, after=seen[-1][0])
    seen += parse_frames(rest)
    assert seen == expected
    # The query parameter works where a header cannot be set (a new EventSource after a page reload).
    _, tail = read(server.url, stream, last_event_id=str(expected[-3][0]))
    assert parse_frames(tail) == expected[-2:]
    # Reconnecting after the end: 204, which tells EventSource to stop.
    assert read(server.url, stream, after=expected[-1][0])[0] == 204


def test_a_reader_may_come_long_after_the_generation_ended(server):
    stream = start(server.url, chat_body(max_tokens=5))
    time.sleep(1.0)  # the generation ends with nobody reading; its frames wait in the store
    status, raw = read(server.url, stream)
    frames = parse_frames(raw)
    assert status == 200 and frames[-1][1] == "[DONE]" and content(frames)


def test_bad_tokens_and_ids_are_refused(server):
    stream = start(server.url, chat_body(max_tokens=2))
    other = start(server.url, chat_body(max_tokens=2))
    base = server.url + f"/v1/streams/{stream['id']}"
    cases = {
        "missing": base,
        "garbage": base + "?token=abc",
        "tampered": server.url + stream["url"][:-2] + ("AA" if not stream["url"].endswith("AA") else "BB"),
        "foreign": base + "?token=" + other["url"].split("token=")[1],
    }
    for name, url in cases.items():
        response = httpx.get(url, timeout=30)
        assert response.status_code == 403, (name, response.text)
        assert response.json()["error"]["code"] == "invalid_stream_token"
    bad_id = httpx.get(server.url + stream["url"], headers={"Last-Event-ID": "x1"}, timeout=30)
    assert bad_id.status_code == 400 and bad_id.json()["error"]["code"] == "invalid_last_event_id"
    bad_body = httpx.post(server.url + "/v1/streams", json={"messages": "hi"}, timeout=30)
    assert bad_body.status_code == 400 and bad_body.json()["error"]["param"] == "messages"
    not_json = httpx.post(server.url + "/v1/streams", content=b"[1]", timeout=30)
    assert not_json.status_code == 400
    unknown_model = httpx.post(server.url + "/v1/streams", json=chat_body(model="nope"), timeout=30)
    assert unknown_model.status_code == 404


@pytest.mark.parametrize(
    "expiry",
    ["soon", None, [1], {"at": 1}, True, float("nan"), float("inf"), 10**400],
    ids=["text", "missing", "list", "object", "bool", "nan", "inf", "huge-int"],
)
def test_a_validly_signed_token_with_a_malformed_expiry_is_refused_not_a_500(server, expiry):
    """Signed with the server's own secret (the same signing code), so only the expiry is wrong."""
    from django.core import signing

    from tripod import streams

    stream = start(server.url, chat_body(max_tokens=2))
    claims = {"s": stream["id"], "e": expiry} if expiry is not None else {"s": stream["id"]}
    token = signing.dumps(claims, salt=streams._SALT, compress=False)
    assert streams.sign(stream["id"], 1) != token  # a real signature over different claims
    for method in ("GET", "DELETE"):
        response = httpx.request(method, server.url + f"/v1/streams/{stream['id']}?token={token}", timeout=30)
        assert response.status_code == 403, (method, expiry, response.text)
        assert response.json()["error"]["code"] == "invalid_stream_token"


def cancel_mid_stream(web_start: str, web_read: str, web_cancel: str) -> list[tuple[int | None, str]]:
    stream = start(web_start, chat_body(**LONG, stream_options={"include_usage": True}))
    _, first = read(web_read, stream, limit=5)
    response = httpx.delete(web_cancel + stream["url"], timeout=30)
    assert response.status_code == 200 and response.json()["cancelled"] is True
    _, rest = read(web_read, stream, after=parse_frames(first)[4][0])
    return parse_frames(first)[:5] + parse_frames(rest)


def assert_cancelled(frames: list[tuple[int | None, str]]) -> None:
    assert frames[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in frames[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "cancelled"
    assert 0 < chunks[-1]["usage"]["completion_tokens"] < LONG["max_tokens"]


def test_delete_cancels_the_generation_and_the_stream_ends_with_exact_usage(server):
    frames = cancel_mid_stream(server.url, server.url, server.url)
    assert_cancelled(frames)


def finish_reason(frames: list[tuple[int | None, str]]) -> str:
    return [json.loads(data) for _, data in frames[:-1] if json.loads(data)["choices"]][-1]["choices"][0][
        "finish_reason"
    ]


def test_keys_expiry_and_abandoned_streams():
    """One server with a key, 8 s URLs and a 2 s reader timeout."""
    env = {"API_KEY": "sk-streams", "TRIPOD_STREAM_TTL": "8", "TRIPOD_STREAM_READER_TIMEOUT": "2"}
    auth = {"headers": {"Authorization": "Bearer sk-streams"}}
    live = LiveServer(env)
    try:
        live.wait_ready()
        # Starting needs the key; reading needs only the URL.
        refused = httpx.post(live.url + "/v1/streams", json=chat_body(max_tokens=2), timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        stream = start(live.url, chat_body(max_tokens=3), **auth)
        status, raw = read(live.url, stream)
        assert status == 200 and parse_frames(raw)[-1][1] == "[DONE]"
        # A connected reader keeps its generation going for longer than the reader timeout, even when it
        # is slow to read ...
        kept = start(
            live.url, chat_body(max_tokens=200, ignore_eos=True, stream_options={"include_usage": True}), **auth
        )
        with httpx.stream("GET", live.url + kept["url"], timeout=60) as response:
            pieces = response.iter_text()
            raw = next(pieces)
            time.sleep(5)
            raw += "".join(pieces)
        assert finish_reason(parse_frames(raw)) == "length"
        # ... and one nobody reads is cancelled; a late reader still gets everything up to the stop.
        abandoned = start(live.url, chat_body(**LONG, stream_options={"include_usage": True}), **auth)
        time.sleep(4)
        assert_cancelled(parse_frames(read(live.url, abandoned)[1]))
        # URLs expire.
        time.sleep(max(0.0, stream["expires_at"] + 1 - time.time()))
        expired = httpx.get(live.url + stream["url"], timeout=30)
        assert expired.status_code == 403 and expired.json()["error"]["code"] == "stream_expired"
    finally:
        live.stop()


WEB_ENV = {"TRIPOD_EVENT_TIMEOUT": "3", "TRIPOD_SSE_KEEPALIVE": "1"}


@pytest.fixture(scope="module")
def scaled(redis_module):
    """Two web processes and one worker sharing a private Redis (short timeouts, for the stalled reader)."""
    with Cluster(redis_module, **WEB_ENV) as cluster:
        webs, _ = cluster.start(webs=2, worker=["--model", "tiny", "--slots", "4"])
        yield webs, cluster


def test_scaled_frames_live_in_redis_and_any_web_process_serves_a_reader(scaled):
    (one, two), cluster = scaled
    stream = start(one.url, chat_body(**GREEDY))
    _, first = read(two.url, stream, limit=4)
    _, rest = read(one.url, stream, after=parse_frames(first)[3][0])
    frames = parse_frames(first)[:4] + parse_frames(rest)
    _, whole = read(two.url, stream)
    assert frames == parse_frames(whole) and frames[-1][1] == "[DONE]"
    client = redis.Redis.from_url(cluster.redis.url)
    assert client.xlen(f"tripod:stream:{stream['id']}") == len(frames)
    assert 0 < client.pttl(f"tripod:stream:{stream['id']}") <= 600_000


def test_scaled_delete_on_another_web_process_cancels(scaled):
    (one, two), _ = scaled
    assert_cancelled(cancel_mid_stream(one.url, two.url, two.url))


def test_scaled_a_reader_learns_that_the_process_running_its_generation_died(scaled):
    (one, _), cluster = scaled
    doomed = cluster.web()
    stream = start(doomed.url, chat_body(**LONG))
    _, first = read(one.url, stream, limit=3)
    doomed.process.kill()  # SIGKILL: no chance to finish anything
    began = time.monotonic()
    _, rest = read(one.url, stream, after=parse_frames(first)[2][0])
    frames = parse_frames(rest)
    assert frames[-1] == (None, "[DONE]")
    assert json.loads(frames[-2][1])["error"]["code"] == "stream_stalled"
    assert time.monotonic() - began < 30
