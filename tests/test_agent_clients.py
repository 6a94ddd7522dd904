"""Agent clients against a real daphne on both engines: the ``openai`` SDK's ``parse()`` and streamed tool calls,
and LangChain's ``ChatOpenAI`` (``bind_tools``, ``with_structured_output``), a third-party client.

The built-in tiny model has random weights, so its replies are noise: every structured reply below is valid only
because the grammar enforces it, which is what these tests check (sampled at temperature 1 over several seeds).
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.processes import LiveServer

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER_PARAMETERS},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
SEEDS = [1, 2, 3, 4, 5]


class Colour(BaseModel):
    name: str
    rgb: list[int]
    warm: bool


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _schema_of(tool_name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == tool_name)


@pytest.mark.parametrize("seed", SEEDS)
def test_parse_gives_a_valid_model_object_at_temperature_1(client, seed):
    completion = client.chat.completions.parse(
        model="tiny",
        messages=[{"role": "user", "content": "Describe a colour."}],
        response_format=Colour,
        temperature=1,
        seed=seed,
        max_tokens=64,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Colour)


def test_json_object_replies_are_json_objects(client):
    for seed in SEEDS:
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, response_format={"type": "json_object"}, seed=seed, max_tokens=48
        )
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_a_schema_the_grammar_engine_cannot_enforce_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}},
            },
        )
    assert info.value.body["param"] == "response_format.json_schema.schema"


@pytest.mark.parametrize("seed", SEEDS)
def test_required_tool_choice_calls_a_tool_with_valid_arguments(client, seed):
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=seed, max_tokens=96
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.tool_calls, choice.message
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), _schema_of(call.function.name))


def test_a_named_function_is_exactly_one_call_of_it(client):
    for seed in SEEDS[:3]:
        reply = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add"}},
            seed=seed,
            max_tokens=64,
        )
        calls = reply.choices[0].message.tool_calls
        assert [call.function.name for call in calls] == ["add"]
        jsonschema.validate(json.loads(calls[0].function.arguments), _schema_of("add"))


def _streamed_calls(client, **body) -> tuple[list[tuple[str, str]], str]:
    with client.chat.completions.stream(**body) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []], choice.finish_reason


def test_streamed_tool_calls_accumulate_to_the_non_streamed_ones(client):
    for seed in SEEDS[:3]:
        body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "seed": seed}
        whole = client.chat.completions.create(**body, max_tokens=96)
        expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
        assert _streamed_calls(client, **body, max_tokens=96) == (expected, "tool_calls")


def test_a_conversation_with_tool_calls_and_results_is_served(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_none_offers_no_tools(client):
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=8, seed=1
    )
    assert reply.choices[0].message.tool_calls is None


@pytest.fixture(scope="module")
def langchain(server) -> ChatOpenAI:
    return ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny", max_retries=0, timeout=120)


def test_langchain_bind_tools_gets_tool_calls(langchain):
    for seed in SEEDS[:3]:
        model = langchain.bind_tools(TOOLS, tool_choice="get_weather").bind(seed=seed, max_tokens=64)
        message = model.invoke([HumanMessage("What is the weather in Oslo?")])
        assert [call["name"] for call in message.tool_calls] == ["get_weather"], message
        jsonschema.validate(message.tool_calls[0]["args"], WEATHER_PARAMETERS)


def test_langchain_structured_output_is_a_model_object(langchain):
    for seed in SEEDS[:3]:
        structured = langchain.bind(seed=seed, max_tokens=64).with_structured_output(Colour)
        assert isinstance(structured.invoke("Describe a colour."), Colour)


def test_streamed_tool_calls_are_the_same_at_every_stream_interval():
    """The same seeded replies streamed one token per delta and four per delta accumulate to the calls of the
    non-streamed replies (the default server's ``auto`` is covered above)."""
    servers = [LiveServer({"TRIPOD_ENGINE": "hf-cb", "TRIPOD_STREAM_INTERVAL": n}) for n in ("1", "4")]
    try:
        body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 96}
        clients = [
            openai.OpenAI(base_url=live.wait_ready().url + "/v1", api_key="unused", max_retries=0, timeout=120)
            for live in servers
        ]
        for seed in SEEDS[:3]:
            whole = clients[0].chat.completions.create(**body, seed=seed)
            expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
            for client in clients:
                assert _streamed_calls(client, **body, seed=seed) == (expected, "tool_calls")
    finally:
        for live in servers:
            live.stop()
