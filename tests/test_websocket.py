"""WebSocket /ws/chat/ through a real daphne with the ``websockets`` client."""

from __future__ import annotations

import json

import pytest
import websockets

from tests.conftest import chat_body


async def frames_until_done(ws, request_id, limit: int = 2000) -> list[dict]:
    frames = []
    for _ in range(limit):
        frame = json.loads(await ws.recv())
        if frame.get("id") != request_id:
            continue
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            return frames
    raise AssertionError("no done frame")


@pytest.fixture
async def ws(server):
    async with websockets.connect(server.ws_url + "/ws/chat/", open_timeout=10) as socket:
        yield socket


async def test_chat_reply_arrives_token_by_token(ws):
    await ws.send(json.dumps({"type": "chat", "id": "r1", **chat_body(max_tokens=12, temperature=0)}))
    frames = await frames_until_done(ws, "r1")
    assert frames[0]["type"] == "start" and frames[0]["model"] == "tiny" and frames[0]["prompt_tokens"] > 0
    deltas = [f for f in frames if f["type"] == "delta"]
    assert len(deltas) > 1
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 12
    assert sum(d["tokens"] for d in deltas) == 12


async def test_two_requests_run_at_once_on_one_socket(ws):
    await ws.send(json.dumps({"type": "chat", "id": "long", **chat_body(max_tokens=200, ignore_eos=True)}))
    await ws.send(json.dumps({"type": "completion", "id": "short", "prompt": "Once", "max_tokens": 3}))
    order = []
    finished = set()
    while finished != {"long", "short"}:
        frame = json.loads(await ws.recv())
        order.append((frame["id"], frame["type"]))
        if frame["type"] == "done":
            finished.add(frame["id"])
    # The short one finished while the long one was already running (admitted, possibly still in prefill).
    assert order.index(("short", "done")) < order.index(("long", "done"))
    assert ("long", "start") in order[: order.index(("short", "done"))]


async def test_same_text_as_rest_for_the_same_greedy_request(ws, server):
    import httpx

    body = chat_body(max_tokens=15, temperature=0)
    rest = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).json()
    await ws.send(json.dumps({"type": "chat", "id": 9, **body}))
    frames = await frames_until_done(ws, 9)
    assert "".join(f["text"] for f in frames if f["type"] == "delta") == rest["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        ("not json", None, "invalid_json"),
        ("[" * 100_000, None, "invalid_json"),
        ('{"type": "chat", "id": 1, "max_tokens": ' + "7" * 5000 + "}", None, "invalid_json"),
        ("[1, 2]", None, "invalid_frame"),
        (json.dumps({"type": "chat", **chat_body()}), "id", "invalid_id"),
        (json.dumps({"type": "dance", "id": "x"}), "type", "invalid_frame"),
        (json.dumps({"type": "chat", "id": "x", "messages": []}), "messages", "invalid_value"),
        (json.dumps({"type": "chat", "id": "x", **chat_body(max_tokens=-1)}), "max_tokens", "invalid_value"),
        (json.dumps({"type": "chat", "id": "x", **chat_body(), "model": "nope"}), "model", "model_not_found"),
        (json.dumps({"type": "cancel", "id": "nothing-running"}), "id", "unknown_id"),
    ],
)
async def test_bad_frames_get_an_error_frame_and_the_socket_stays_usable(ws, raw, param, code):
    await ws.send(raw)
    frame = json.loads(await ws.recv())
    assert frame["type"] == "error"
    assert frame["error"]["code"] == code
    if param:
        assert frame["error"]["param"] == param
    await ws.send(json.dumps({"type": "completion", "id": "after", "prompt": "hi", "max_tokens": 2}))
    assert (await frames_until_done(ws, "after"))[-1]["type"] == "done"


async def test_binary_frames_are_refused_politely(ws):
    await ws.send(b"\x00\x01")
    frame = json.loads(await ws.recv())
    assert frame["type"] == "error" and frame["error"]["code"] == "invalid_frame"


async def test_prompt_too_long_is_an_error_frame_for_that_request(ws):
    await ws.send(json.dumps({"type": "chat", "id": "big", **chat_body("word " * 2100)}))
    frames = await frames_until_done(ws, "big")
    assert frames[-1]["type"] == "error"
    assert frames[-1]["error"]["code"] == "context_length_exceeded"


def per_socket_limit(request) -> int:
    """Half the engine's slots (hf: 4, hf-cb: 64), at most the server's TRIPOD_WS_MAX_INFLIGHT (4)."""
    slots = 4 if request.node.callspec.params["server"] == "hf" else 64
    return min(4, slots // 2)


async def test_duplicate_ids_and_the_per_socket_limit(request, ws):
    limit = per_socket_limit(request)
    for i in range(limit):
        await ws.send(json.dumps({"type": "chat", "id": f"j{i}", **chat_body(max_tokens=1800, ignore_eos=True)}))
    await ws.send(json.dumps({"type": "chat", "id": "j0", **chat_body()}))
    await ws.send(json.dumps({"type": "chat", "id": "over", **chat_body()}))
    errors = {}
    while len(errors) < 2:
        frame = json.loads(await ws.recv())
        if frame["type"] == "error":
            errors[frame["id"]] = frame["error"]["code"]
    assert errors == {"j0": "duplicate_id", "over": "too_many_requests"}
    for i in range(limit):
        await ws.send(json.dumps({"type": "cancel", "id": f"j{i}"}))
    done = set()
    while len(done) < limit:
        frame = json.loads(await ws.recv())
        if frame["type"] == "done":
            assert frame["finish_reason"] == "cancelled"
            done.add(frame["id"])


async def test_a_socket_that_never_reads_leaves_slots_for_other_clients(request, server):
    """A socket may hold half the slots: another client's request runs beside its long generations at once,
    instead of queueing behind them (before, 8 per socket could fill the 4 slots of ``hf``)."""
    greedy = await websockets.connect(server.ws_url + "/ws/chat/", open_timeout=10)
    try:
        for i in range(4):  # sent, and then never read until the other client is done
            await greedy.send(json.dumps({"type": "chat", "id": f"g{i}", **chat_body(max_tokens=1800)}))
        async with websockets.connect(server.ws_url + "/ws/chat/", open_timeout=10) as other:
            await other.send(json.dumps({"type": "chat", "id": "o", **chat_body(max_tokens=4)}))
            assert (await frames_until_done(other, "o"))[-1]["finish_reason"] == "length"
        running = [f"g{i}" for i in range(per_socket_limit(request))]
        for request_id in running:
            await greedy.send(json.dumps({"type": "cancel", "id": request_id}))
        ended = {}
        while len(ended) < 4:
            frame = json.loads(await greedy.recv())
            if frame["type"] in ("done", "error"):
                ended.setdefault(frame["id"], frame.get("finish_reason") or frame["error"]["code"])
        # The greedy socket's own share was still generating when the other client finished; the rest was refused.
        assert ended == {i: "cancelled" if i in running else "too_many_requests" for i in ended}, ended
    finally:
        await greedy.close()
