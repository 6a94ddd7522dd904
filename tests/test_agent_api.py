"""The request surface of agents through a real daphne on both engines, with the official ``openai`` SDK: ``n``,
logprobs and ``logit_bias``, over REST, SSE and WebSocket."""

from __future__ import annotations

import json

import openai
import pytest
import websockets.sync.client
from openai.lib.streaming.chat import ChatCompletionStreamState

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_n_choices_are_the_seeded_choices_one_by_one(client):
    whole = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, n=3, seed=40, extra_body={"ignore_eos": True}
    )
    assert [choice.index for choice in whole.choices] == [0, 1, 2]
    assert all(choice.finish_reason == "length" for choice in whole.choices)
    assert whole.usage.completion_tokens == 18
    for choice in whole.choices:  # choice i samples with seed + i
        alone = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=6, seed=40 + choice.index, extra_body={"ignore_eos": True}
        )
        assert alone.choices[0].message.content == choice.message.content
    assert len({choice.message.content for choice in whole.choices}) > 1


def test_streamed_n_choices_carry_their_index_and_match_the_whole_reply(client):
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 8,
        "n": 2,
        "seed": 7,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.chat.completions.create(**body)
    texts, finished, roles = {0: "", 1: ""}, {}, []
    stream = client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.append(choice.index)
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finished == {0: "length", 1: "length"}
    assert roles == [0, 1]  # each choice's role first, in index order, whichever choice speaks first
    assert usage.completion_tokens == 16
    # The SDK's own accumulator (its stream helper's) needs choice 0 first.
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(**body, stream=True):
        state.handle_chunk(chunk)
    snapshot = state.current_completion_snapshot
    assert [c.message.content for c in snapshot.choices] == [c.message.content for c in whole.choices]


def test_text_completions_take_n_and_logprobs(client):
    response = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, n=2, logprobs=3, seed=1)
    assert [choice.index for choice in response.choices] == [0, 1]
    for choice in response.choices:
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
        assert all(len(top) <= 3 for top in logprobs.top_logprobs) and all(lp <= 0 for lp in logprobs.token_logprobs)
        assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert response.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in response.choices)


def test_chat_logprobs_one_per_token_with_sorted_alternatives(client):
    response = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=10,
        logprobs=True,
        top_logprobs=5,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens == 10
    assert b"".join(bytes(entry.bytes) for entry in content).decode(errors="replace") == choice.message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob <= values[0] + 1e-4
    plain = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=10, seed=3, extra_body={"ignore_eos": True}
    )
    assert plain.choices[0].message.content == choice.message.content  # asking for logprobs changes nothing
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_cover_every_token(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=12,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    entries, text, usage = [], "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                entries.extend(choice.logprobs.content)
    assert len(entries) == usage.completion_tokens == 12
    assert b"".join(bytes(entry.bytes) for entry in entries).decode(errors="replace") == text


def test_logit_bias_forces_and_bans_tokens(client, chat_model):
    tokenizer = chat_model.tokenizer
    forced = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, logit_bias={"300": 100}, extra_body={"ignore_eos": True}
    )
    assert forced.choices[0].message.content == tokenizer.decode([300]) * 6  # every token is token 300
    greedy = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, temperature=0, logprobs=True)
    first = bytes(greedy.choices[0].logprobs.content[0].bytes)
    same = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).encode() == first]
    assert same
    banned = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=1,
        temperature=0,
        logprobs=True,
        logit_bias={str(i): -100 for i in same},
    )
    assert bytes(banned.choices[0].logprobs.content[0].bytes) != first
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, logit_bias={"999999": 5})
    assert info.value.body["param"] == "logit_bias"


def test_bad_input_is_a_400_naming_the_field_through_the_sdk(client):
    cases = [
        ({"n": 9}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **extra)
        assert info.value.body["param"] == param


def test_websocket_frames_carry_the_choice_and_logprobs(server):
    with websockets.sync.client.connect(server.ws_url + "/ws/chat/") as socket:
        frame = {"type": "chat", "id": "a", "messages": MESSAGES, "max_tokens": 4, "n": 2, "logprobs": True}
        socket.send(json.dumps({**frame, "ignore_eos": True}))
        deltas, done = [], None
        while done is None:
            message = json.loads(socket.recv(timeout=60))
            assert message["type"] != "error", message
            if message["type"] == "delta":
                deltas.append(message)
            elif message["type"] == "done":
                done = message
    assert {delta["index"] for delta in deltas} == {0, 1}
    assert sum(len(delta["logprobs"]) for delta in deltas) == done["usage"]["completion_tokens"] == 8
    assert done["finish_reasons"] == ["length", "length"]


def test_websocket_tool_calls_come_as_pieces_and_end_with_tool_calls(server):
    tool = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
    frame = {"type": "chat", "id": 7, "messages": MESSAGES, "tools": [tool], "tool_choice": "required", "seed": 2}
    with websockets.sync.client.connect(server.ws_url + "/ws/chat/") as socket:
        socket.send(json.dumps({**frame, "max_tokens": 32}))
        pieces, done = [], None
        while done is None:
            message = json.loads(socket.recv(timeout=60))
            assert message["type"] != "error", message
            if message["type"] == "delta":
                pieces.extend(message.get("tool_calls", []))
            elif message["type"] == "done":
                done = message
    assert done["finish_reason"] == "tool_calls"
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["name"] == "ping"
    assert isinstance(json.loads("".join(piece["function"]["arguments"] for piece in pieces)), dict)
