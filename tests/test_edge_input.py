"""Input at the edge: lone UTF-16 surrogates anywhere in a body, and any ``Accept`` header on the generation
endpoints (SSE clients such as ``httpx-sse`` send ``Accept: text/event-stream``)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import websockets
from httpx_sse import connect_sse

from tests.conftest import chat_body, sse_json
from tests.test_observability import delta, scrape

LONE = "\ud800"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
PROMPT = {"model": "tiny", "prompt": "Once", "max_tokens": 2}


def post_raw(url: str, body: dict | bytes, **headers: str) -> httpx.Response:
    """POST a body as ``json.dumps`` writes it: a lone surrogate goes out as the escape ``\\ud800``, which is
    valid JSON (httpx's own ``json=`` could not encode it)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=content, headers={"Content-Type": "application/json", **headers}, timeout=60)


def assert_invalid_unicode(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    response.content.decode("utf-8")  # strict: the error body is valid UTF-8
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_unicode"
    assert error["param"] == param
    assert LONE not in json.dumps(error, ensure_ascii=False), "the surrogate is never echoed raw"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a" + LONE}]}]},
            "messages[0].content[0].text",
        ),
        ("/v1/chat/completions", {**CHAT, "model": LONE}, "model"),
        ("/v1/chat/completions", {**CHAT, "stop": ["ok", LONE]}, "stop[1]"),
        ("/v1/chat/completions", {**CHAT, "user": LONE}, "user"),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "messages": [{"role": "user", "content": LONE}]},
            "messages[0].content",
        ),
        ("/v1/chat/completions", {**CHAT, LONE: 1}, "\\ud800"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "Hi", "x" + LONE: 1}]},
            "messages[0].x\\ud800",
        ),
        ("/v1/completions", {**PROMPT, "prompt": LONE}, "prompt"),
        ("/v1/completions", {**PROMPT, "prompt": [LONE]}, "prompt[0]"),
        ("/v1/completions", {**PROMPT, "stream": True, "stop": LONE}, "stop"),
        ("/v1/streams", {**CHAT, "messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
        ("/v1/streams", {**CHAT, LONE: 1}, "\\ud800"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, param):
    assert_invalid_unicode(post_raw(server.url + path, body), param)


def test_a_surrogate_sent_as_raw_utf8_bytes_is_the_same_400(server):
    # ED A0 80 is U+D800 encoded as if it were a character (CESU-8); Python's JSON reader lets it through.
    body = b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'
    assert_invalid_unicode(post_raw(server.url + "/v1/chat/completions", body), "messages[0].content")


def test_a_surrogate_pair_is_one_character_and_served(server):
    response = post_raw(
        server.url + "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\U0001f600"}]}
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


async def test_the_renderer_escapes_what_utf8_cannot_hold():
    from tripod.api.renderers import OpenAIJSONRenderer

    # Nothing the edge lets through holds a lone surrogate; an error that ever quotes one is still no 500.
    rendered = OpenAIJSONRenderer().render({"error": {"message": "bad: " + LONE, "param": "caf\u00e9"}})
    assert json.loads(rendered.decode("utf-8"))["error"]["message"] == "bad: " + LONE
    assert "café".encode() in OpenAIJSONRenderer().render({"param": "café"}), "valid text stays unescaped"


async def test_websocket_frame_gets_an_error_frame_and_the_socket_goes_on(server):
    async with websockets.connect(server.ws_url + "/ws/chat/", open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "chat", "id": "bad", **chat_body(LONE, max_tokens=2)}))
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["id"] == "bad"
        assert error["error"]["code"] == "invalid_unicode" and error["error"]["param"] == "messages[0].content"

        await ws.send(json.dumps({"type": "completion", "id": "stop", "prompt": "x", "stop": ["a", LONE]}))
        error = json.loads(await ws.recv())
        assert error["id"] == "stop" and error["error"]["param"] == "stop[1]"

        # An id that is itself bad is not echoed back.
        await ws.send(json.dumps({"type": "chat", "id": LONE, **chat_body(max_tokens=2)}))
        error = json.loads(await ws.recv())
        assert error["id"] is None and error["error"]["param"] == "id"

        await ws.send(json.dumps({"type": "completion", "id": "ok", "prompt": "Once", "max_tokens": 2}))
        frames = [json.loads(await ws.recv()) for _ in range(3)]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await ws.recv()))
        assert frames[-1]["type"] == "done" and frames[-1]["usage"]["completion_tokens"] == 2


def counted(metrics: dict) -> float:
    """Every request the web tier counted as ended, successfully or not."""
    return sum(
        v for (name, _), v in metrics.items() if name in ("tripod:request_success_total", "tripod:request_errors_total")
    )


def test_scaled_a_surrogate_stop_is_a_400_and_counted_as_no_request(cluster):
    (web,), _ = cluster.start(webs=1, worker=["--slots", "2"], TRIPOD_NO_WORKER_WAIT="5")
    before = scrape(web)
    refused = [
        post_raw(web.url + path, {**body, "stop": [LONE]})
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", PROMPT), ("/v1/streams", CHAT))
    ]
    served = post_raw(web.url + "/v1/chat/completions", {**CHAT, "stop": ["\U0001f600"]})
    assert served.status_code == 200, served.text
    deadline = time.monotonic() + 10
    while counted(after := scrape(web)) == counted(before) and time.monotonic() < deadline:
        time.sleep(0.1)
    # Only the request that was served counts; the refused ones are neither successes nor "cancelled".
    changed = {
        k: after[k] - before.get(k, 0)
        for k in after
        if k[0] in ("tripod:request_success_total", "tripod:request_errors_total") and after[k] != before.get(k, 0)
    }
    assert counted(after) - counted(before) == 1, changed
    assert delta(before, after, "tripod:request_success_total", transport="rest", finished_reason="length") == 1
    for response in refused:
        assert_invalid_unicode(response, "stop[0]")


# --- Accept -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("accept", ["text/event-stream", "*/*", "application/json, text/event-stream", "text/html"])
@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", PROMPT)])
def test_any_accept_gets_json_when_not_streaming(server, path, body, accept):
    response = httpx.post(server.url + path, json=body, headers={"Accept": accept}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("accept", ["text/event-stream", "application/json, text/event-stream"])
def test_any_accept_gets_a_json_error(server, accept):
    response = httpx.post(
        server.url + "/v1/chat/completions", json={**CHAT, "temperature": 9}, headers={"Accept": accept}, timeout=60
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "temperature"


@pytest.mark.parametrize(
    ("path", "body", "text"),
    [
        ("/v1/chat/completions", CHAT, lambda chunk: chunk["choices"][0]["delta"].get("content")),
        ("/v1/completions", PROMPT, lambda chunk: chunk["choices"][0]["text"]),
    ],
)
def test_httpx_sse_streams_a_completion(server, path, body, text):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with connect_sse(client, "POST", path, json={**body, "stream": True, "ignore_eos": True}) as events:
            assert events.response.status_code == 200
            data = [event.data for event in events.iter_sse()]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(text(c) or "" for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_httpx_sse_starts_and_reads_a_resumable_stream(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with connect_sse(client, "POST", "/v1/streams", json={**CHAT, "ignore_eos": True}) as created:
            assert created.response.status_code == 201, created.response.read()
            stream = json.loads(created.response.read())
        with connect_sse(client, "GET", stream["url"]) as events:
            frames = [event for event in events.iter_sse() if event.data]  # the first sets only `retry:`
    assert frames[-1].data == "[DONE]"
    assert [int(f.id) for f in frames] == list(range(1, len(frames) + 1))
    chunks = sse_json("".join(f"data: {f.data}\n" for f in frames))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
