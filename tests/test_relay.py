"""The ``openai`` engine relays to an OpenAI-compatible upstream: here, a second instance of this server."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import chat_body
from tests.processes import Cluster, LiveServer
from tripod.engines.base import Delta, TokenLogprob, ToolCallDelta
from tripod.engines.openai_relay import OpenAIRelayModel, RelayGeneration
from tripod.protocol import ResponseFormat, SamplingParams, Tool, ToolUse

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


def relay_front(cluster: Cluster, served_name: str, upstream_model: str, **upstream: str) -> LiveServer:
    """A web process that serves ``served_name`` through an ``openai``-engine worker, which asks the upstream that
    ``upstream`` (its ``TRIPOD_UPSTREAM_*`` variables) names for ``upstream_model``."""
    front = cluster.web(TRIPOD_SERVED_MODEL_NAME=served_name)
    cluster.worker("--engine", "openai", "--model", upstream_model, "--served-model-name", served_name, **upstream)
    return front


@pytest.fixture(scope="module")
def relay(redis_module):
    """upstream: an embedded Tripod on the tiny model; front: web + an ``openai``-engine worker."""
    with LiveServer() as upstream, Cluster(redis_module) as cluster:
        upstream.wait_ready()
        upstream_env = {"TRIPOD_UPSTREAM_URL": upstream.url + "/v1", "TRIPOD_UPSTREAM_API_KEY": "sk-upstream"}
        yield upstream, relay_front(cluster, "relayed", "tiny", **upstream_env)


def clients(relay) -> tuple[openai.OpenAI, openai.OpenAI]:
    upstream, front = relay
    make = lambda url: openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)  # noqa: E731
    return make(upstream.url), make(front.url)


def test_relayed_completions_match_the_upstream(relay):
    direct, relayed = clients(relay)
    assert [m.id for m in relayed.models.list()] == ["relayed"]
    want = direct.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    got = relayed.chat.completions.create(model="relayed", messages=MESSAGES, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage == want.usage
    assert got.model == "relayed"
    stream = relayed.chat.completions.create(
        model="relayed",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    assert chunks[-1].usage == want.usage
    text = relayed.completions.create(model="relayed", prompt="Once upon", max_tokens=5, temperature=0)
    assert (
        text.choices[0].text
        == direct.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0).choices[0].text
    )


def test_seed_and_stop_pass_through(relay):
    direct, relayed = clients(relay)
    want = direct.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, seed=4)
    text = want.choices[0].message.content
    stop = text[6:9]
    got = relayed.chat.completions.create(model="relayed", messages=MESSAGES, max_tokens=20, seed=4, stop=stop)
    assert got.choices[0].message.content == text[: text.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_upstream_errors_keep_their_status_and_code(relay):
    _, front = relay
    response = httpx.post(front.url + "/v1/chat/completions", json={**chat_body("word " * 2100), "model": "relayed"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_a_client_leaving_the_front_cancels_the_upstream_generation(relay):
    upstream, front = relay
    body = {**chat_body(max_tokens=1900, ignore_eos=True, stream=True), "model": "relayed"}
    with httpx.stream("POST", front.url + "/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                break
    deadline = time.monotonic() + 10
    while "finish_reason=cancelled" not in upstream.output():
        assert time.monotonic() < deadline, "the upstream never stopped"
        time.sleep(0.05)
    line = [entry for entry in upstream.output().splitlines() if "finish_reason=cancelled" in entry][-1]
    assert int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 1900


def test_an_upstream_that_refuses_this_server_is_a_502_not_the_clients_fault(relay, redis_module):
    upstream, _ = relay
    with Cluster(redis_module) as cluster:
        upstream_env = {"TRIPOD_UPSTREAM_URL": upstream.url + "/v1"}
        front = relay_front(cluster, "misconfigured", "no-such-upstream-model", **upstream_env)
        response = httpx.post(front.url + "/v1/chat/completions", json={**chat_body(), "model": "misconfigured"})
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_error"


# The new request surface (issue 21), against a stand-in upstream: a small HTTP server in this process that
# records each request body and replays canned OpenAI SSE. The upstream is outside the system, so it is the one
# thing these tests stand in for; the engine is driven in-process and read at its raw generation.


class StandInUpstream:
    """A stand-in OpenAI-compatible upstream on a free port: records request bodies, replays ``self.chunks``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.chunks: list[dict] = []
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.requests.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for chunk in upstream.chunks:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def body(self) -> dict:
        return self.requests[-1][1]


@pytest.fixture
def stand_in() -> Iterator[StandInUpstream]:
    upstream = StandInUpstream()
    upstream.thread.start()
    try:
        yield upstream
    finally:
        upstream.server.shutdown()
        upstream.server.server_close()


@pytest.fixture
def relay_model(stand_in) -> OpenAIRelayModel:
    model = OpenAIRelayModel(model_name="relayed", path="upstream-model", upstream_url=stand_in.url)
    model.load()
    return model


def chat_chunk(*choices: dict, usage: dict | None = None) -> dict:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "upstream-model"}
    return {**chunk, "choices": list(choices), **({"usage": usage} if usage else {})}


def choice(index: int = 0, finish_reason: str | None = None, logprobs: dict | None = None, **delta) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


def relayed(model: OpenAIRelayModel, prompt, **params) -> tuple[list[Delta], RelayGeneration]:
    """Start a generation and read every delta the relay's raw generation yields."""
    raw = model.start(prompt, SamplingParams(**params)).raw
    return list(raw), raw


def test_a_plain_request_sends_what_it_sent_before_the_new_fields(stand_in, relay_model):
    stand_in.chunks = [chat_chunk(choice(role="assistant", content="Hi")), chat_chunk(choice(finish_reason="stop"))]
    relayed(relay_model, MESSAGES, max_tokens=12, temperature=0.0)
    assert stand_in.requests[-1] == (
        "/v1/chat/completions",
        {
            "model": "upstream-model",
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0,
            "top_p": 1.0,
            "messages": MESSAGES,
            "max_tokens": 12,
        },
    )
    stand_in.chunks = [{"id": "cmpl-1", "choices": [{"index": 0, "text": "upon", "finish_reason": "length"}]}]
    relayed(relay_model, "Once", max_tokens=1)
    path, body = stand_in.requests[-1]
    assert path == "/v1/completions"
    assert body == {
        "model": "upstream-model",
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 1.0,
        "top_p": 1.0,
        "prompt": "Once",
        "max_tokens": 1,
    }


WEATHER = Tool(
    name="get_weather",
    description="The weather in a city.",
    parameters='{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}',
    strict=True,
)
LOOKUP = Tool(name="lookup")
SCHEMA = '{"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}'


def test_every_new_field_arrives_upstream_as_openai_names_it(stand_in, relay_model):
    stand_in.chunks = [chat_chunk(choice(finish_reason="stop"))]
    relayed(
        relay_model,
        MESSAGES,
        n=2,
        logprobs=True,
        top_logprobs=3,
        logit_bias=((5, -100.0), (42, 2.5)),
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        response_format=ResponseFormat(type="json_schema", schema=SCHEMA, name="answer", strict=True),
        tools=ToolUse(tools=(WEATHER, LOOKUP), choice="function", function="get_weather", parallel=False),
    )
    body = stand_in.body
    assert {k: body[k] for k in ("n", "logprobs", "top_logprobs", "logit_bias")} == {
        "n": 2,
        "logprobs": True,
        "top_logprobs": 3,
        "logit_bias": {"5": -100.0, "42": 2.5},
    }
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, -0.25)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": json.loads(SCHEMA), "strict": True},
    }
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": json.loads(WEATHER.parameters),
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False

    relayed(
        relay_model,
        MESSAGES,
        logprobs=True,
        response_format=ResponseFormat(type="json_object"),
        tools=ToolUse(tools=(LOOKUP,), choice="required"),
    )
    body = stand_in.body
    assert body["logprobs"] is True and "top_logprobs" not in body
    assert body["response_format"] == {"type": "json_object"}
    assert (body["tool_choice"], "parallel_tool_calls" in body) == ("required", False)

    relayed(relay_model, MESSAGES, tools=ToolUse(tools=(LOOKUP,)))
    assert stand_in.body["tool_choice"] == "auto"

    relayed(relay_model, MESSAGES, tools=None)  # tool_choice "none" arrives as no tools: none are offered
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(stand_in.body)

    stand_in.chunks = [{"id": "cmpl-1", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}]
    relayed(relay_model, "Once", logprobs=True, top_logprobs=0)
    assert stand_in.body["logprobs"] == 0  # text completions take the number of alternatives, 0 included
    relayed(relay_model, "Once", logprobs=True, top_logprobs=4)
    assert stand_in.body["logprobs"] == 4 and "top_logprobs" not in stand_in.body


def test_the_upstreams_tool_calls_come_back_as_tool_call_deltas(stand_in, relay_model):
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    stand_in.chunks = [
        chat_chunk(choice(role="assistant", content=None, tool_calls=[call])),
        chat_chunk(choice(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}])),
        chat_chunk(choice(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}])),
        chat_chunk(
            choice(tool_calls=[{"index": 1, "id": "call_2", "function": {"name": "lookup", "arguments": "{}"}}])
        ),
        chat_chunk(choice(finish_reason="tool_calls")),
        chat_chunk(usage=USAGE),
    ]
    deltas, raw = relayed(relay_model, MESSAGES, tools=ToolUse(tools=(WEATHER, LOOKUP)))
    assert [d.tool_calls for d in deltas] == [
        (ToolCallDelta(index=0, id="call_1", name="get_weather", arguments=""),),
        (ToolCallDelta(index=0, arguments='{"city": '),),
        (ToolCallDelta(index=0, arguments='"Paris"}'),),
        (ToolCallDelta(index=1, id="call_2", name="lookup", arguments="{}"),),
    ]
    assert [(d.text, d.tokens, d.index) for d in deltas] == [("", 1, 0)] * 4
    assert raw.finish_reasons == {0: "tool_calls"}
    assert raw.eos  # the model ended its reply itself, with calls
    assert (raw.prompt_tokens, raw.completion_tokens) == (9, 4)


def test_n_choices_keep_the_upstreams_index_and_finish_reason(stand_in, relay_model):
    stand_in.chunks = [
        chat_chunk(choice(0, role="assistant", content=""), choice(1, role="assistant", content="")),
        chat_chunk(choice(0, content="Hel")),
        chat_chunk(choice(1, content="Good")),
        chat_chunk(choice(1, content="bye", finish_reason="length")),
        chat_chunk(choice(0, content="lo")),
        chat_chunk(choice(0, finish_reason="stop")),
        chat_chunk(usage=USAGE),
    ]
    deltas, raw = relayed(relay_model, MESSAGES, n=2, max_tokens=2)
    assert [(d.index, d.text, d.tokens) for d in deltas] == [(0, "Hel", 1), (1, "Good", 1), (1, "bye", 1), (0, "lo", 1)]
    assert raw.finish_reasons == {0: "stop", 1: "length"}
    assert (raw.finish_reason, raw.eos) == ("stop", True)  # index 0's, as a one-choice reader sees it
    assert raw.completion_tokens == 4


def test_chat_logprobs_come_back_one_per_token(stand_in, relay_model):
    def entry(token: str, logprob: float, top: list, raw_bytes: list | None = None) -> dict:
        return {"token": token, "logprob": logprob, "bytes": raw_bytes, "top_logprobs": top}

    first = entry("Hi", -0.5, [entry("Hi", -0.5, [], [72, 105]), entry("Hey", -1.5, [], [72, 101, 121])], [72, 105])
    # Two tokens behind one chunk (an upstream that merges steps); one of them is half of a UTF-8 character.
    second = [entry(" th", -0.25, []), entry("bytes:\\xc3", -2.0, [], [195])]
    stand_in.chunks = [
        chat_chunk(choice(role="assistant", content="")),
        chat_chunk(choice(content="Hi", logprobs={"content": [first]})),
        chat_chunk(choice(content=" th", logprobs={"content": second})),
        chat_chunk(choice(finish_reason="length", logprobs={"content": []})),
    ]
    deltas, raw = relayed(relay_model, MESSAGES, logprobs=True, top_logprobs=2)
    assert [(d.text, d.tokens, len(d.logprobs)) for d in deltas] == [("Hi", 1, 1), (" th", 2, 2)]
    assert deltas[0].logprobs == (
        TokenLogprob("Hi", (72, 105), -0.5, (("Hi", (72, 105), -0.5), ("Hey", (72, 101, 121), -1.5))),
    )
    assert deltas[1].logprobs == (
        TokenLogprob(" th", tuple(b" th"), -0.25),  # no bytes from the upstream: the token's UTF-8
        TokenLogprob("bytes:\\xc3", (195,), -2.0),
    )
    assert raw.finish_reasons == {0: "length"} and not raw.eos

    deltas, _ = relayed(relay_model, MESSAGES)  # not asked for: none relayed, even if the upstream sends them
    assert [(d.tokens, d.logprobs) for d in deltas] == [(1, ()), (1, ())]


def test_text_completion_logprobs_are_converted_from_parallel_lists(stand_in, relay_model):
    logprobs = {
        "tokens": [" upon", " a"],
        "token_logprobs": [-0.1, -0.7],
        "top_logprobs": [{" upon": -0.1, " in": -3.0}, {" a": -0.7, " the": -0.9}],
        "text_offset": [4, 9],
    }
    stand_in.chunks = [
        {"id": "cmpl-1", "choices": [{"index": 0, "text": " upon a", "logprobs": logprobs, "finish_reason": None}]},
        {"id": "cmpl-1", "choices": [{"index": 1, "text": "!", "logprobs": None, "finish_reason": "length"}]},
        {"id": "cmpl-1", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
    ]
    deltas, raw = relayed(relay_model, "Once", n=2, logprobs=True, top_logprobs=2)
    # Choice 1 came without logprobs: its text is relayed, counting no tokens, so tokens and logprobs agree.
    assert [(d.index, d.text, d.tokens, len(d.logprobs)) for d in deltas] == [(0, " upon a", 2, 2), (1, "!", 0, 0)]
    assert deltas[0].logprobs == (
        TokenLogprob(" upon", tuple(b" upon"), -0.1, ((" upon", tuple(b" upon"), -0.1), (" in", tuple(b" in"), -3.0))),
        TokenLogprob(" a", tuple(b" a"), -0.7, ((" a", tuple(b" a"), -0.7), (" the", tuple(b" the"), -0.9))),
    )
    assert raw.finish_reasons == {0: "length", 1: "length"}


def test_the_relay_emits_its_upstreams_choices():
    assert OpenAIRelayModel.emits_choices


RELAY_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def _calls(choice) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in choice.message.tool_calls or []]


def test_tools_n_and_logprobs_pass_through_the_relay_and_redis(relay):
    """Web process -> Redis -> openai-engine worker -> upstream Tripod and back: the upstream's choices, tool calls
    and logprobs reach the client as the upstream made them, streamed or not."""
    upstream, front = relay
    body = {
        "messages": MESSAGES,
        "tools": RELAY_TOOLS,
        "tool_choice": "required",
        "n": 2,
        "seed": 11,
        "logprobs": True,
        "max_tokens": 48,
    }
    through = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    direct = openai.OpenAI(base_url=upstream.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    relayed = through.chat.completions.create(model="relayed", **body)
    expected = direct.chat.completions.create(model="tiny", **body)
    assert [c.finish_reason for c in relayed.choices] == ["tool_calls", "tool_calls"]
    assert [_calls(c) for c in relayed.choices] == [_calls(c) for c in expected.choices]
    assert all(_calls(c) for c in relayed.choices)
    assert [len(c.logprobs.content) for c in relayed.choices] == [len(c.logprobs.content) for c in expected.choices]
    assert relayed.usage.completion_tokens == expected.usage.completion_tokens
    with through.chat.completions.stream(model="relayed", **body) as stream:
        streamed = stream.get_final_completion()
    assert [_calls(c) for c in streamed.choices] == [_calls(c) for c in expected.choices]
    assert [c.finish_reason for c in streamed.choices] == ["tool_calls", "tool_calls"]
    one = through.chat.completions.create(model="relayed", **{**body, "n": 1})
    assert one.choices[0].finish_reason == "tool_calls" and _calls(one.choices[0])  # the upstream's, not "stop"
