"""The request surface of agents at the edge: tools, tool_choice, response_format, n, logprobs and logit_bias.

Each bad value is a 400 naming its field, before anything reaches a worker; each good one becomes the typed value the
engines trust.
"""

from __future__ import annotations

import json

import pytest

from tripod.errors import InvalidRequest
from tripod.protocol import parse_chat_request, parse_completion_request

USER = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def chat(**body):
    return parse_chat_request({"messages": USER, **body}, max_messages=8, max_n=4)


def fn(name="f", **function):
    return {"type": "function", "function": {"name": name, **function}}


BAD = [
    ("tools[0].function.name", {"tools": [{"type": "function", "function": {}}]}),
    ("tools[0].function.name", {"tools": [fn("has space")]}),
    ("tools[0].function.name", {"tools": [fn("x" * 65)]}),
    ("tools[0].type", {"tools": [{"type": "retrieval"}]}),
    ("tools[0].function", {"tools": [{"type": "function"}]}),
    ("tools[0].function.parameters", {"tools": [fn(parameters={"type": "nonsense"})]}),
    ("tools[0].function.parameters", {"tools": [fn(parameters=["not", "a", "schema"])]}),
    ("tools[0].function.parameters", {"tools": [fn(parameters={"type": "object", "minProperties": -1})]}),
    ("tools[1].function.name", {"tools": [fn("f"), fn("f")]}),
    ("tools", {"tools": {"type": "function"}}),
    ("tools", {"tools": [fn(f"f{i}") for i in range(129)]}),
    ("tool_choice", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    ("tool_choice", {"tools": [WEATHER], "tool_choice": "sometimes"}),
    ("tool_choice", {"tool_choice": "required"}),
    ("tool_choice.function.name", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {}}}),
    ("parallel_tool_calls", {"tools": [WEATHER], "parallel_tool_calls": "yes"}),
    ("functions", {"functions": [{"name": "f"}]}),
    ("response_format.type", {"response_format": {"type": "xml"}}),
    ("response_format", {"response_format": "json"}),
    ("response_format.json_schema", {"response_format": {"type": "json_schema"}}),
    ("response_format.json_schema.name", {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
    (
        "response_format.json_schema.schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
    ),
    (
        "response_format.json_schema.schema",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "description": "d" * 70_000}},
            }
        },
    ),
    ("ignore_eos", {"ignore_eos": True, "response_format": {"type": "json_object"}}),
    ("n", {"n": 5}),
    ("n", {"n": 0}),
    ("n", {"n": 1.5}),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    ("top_logprobs", {"logprobs": True, "top_logprobs": -1}),
    ("top_logprobs", {"top_logprobs": 3}),
    ("logprobs", {"logprobs": 3}),
    ("logit_bias", {"logit_bias": {"abc": 1}}),
    ("logit_bias", {"logit_bias": {"-5": 1}}),
    ("logit_bias", {"logit_bias": {"5": 101}}),
    ("logit_bias", {"logit_bias": {"5": "high"}}),
    ("logit_bias", {"logit_bias": [5, 1]}),
    ("logit_bias", {"logit_bias": {str(i): 1 for i in range(1025)}}),
]


@pytest.mark.parametrize(("param", "body"), BAD, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(param, body):
    with pytest.raises(InvalidRequest) as info:
        chat(**body)
    assert info.value.param == param, info.value.message
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("param", "body"),
    [("logprobs", {"logprobs": 21}), ("logprobs", {"logprobs": True}), ("n", {"n": 9}), ("suffix", {"suffix": "x"})],
)
def test_bad_completion_input_is_a_400_naming_the_field(param, body):
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request({"prompt": "x", **body}, max_n=8)
    assert info.value.param == param, info.value.message


def test_tools_become_typed_tools_with_their_schema_as_json():
    params = chat(tools=[WEATHER, fn("ping")], parallel_tool_calls=False).params
    tools = params.tools
    assert [tool.name for tool in tools.tools] == ["get_weather", "ping"]
    assert json.loads(tools.tools[0].parameters)["required"] == ["city"]
    assert json.loads(tools.tools[1].parameters) == {"type": "object", "properties": {}}
    assert tools.choice == "auto" and not tools.forced and not tools.parallel
    assert tools.tools[0].as_template_tool()["function"]["parameters"]["properties"] == {"city": {"type": "string"}}


def test_tool_choice_forms():
    assert chat(tools=[WEATHER], tool_choice="none").params.tools is None
    assert chat(tools=[WEATHER], tool_choice="required").params.tools.forced
    named = chat(tools=[WEATHER, fn("ping")], tool_choice={"type": "function", "function": {"name": "ping"}})
    assert named.params.tools.choice == "function" and named.params.tools.function == "ping"
    assert not named.params.tools.parallel  # a named function is exactly one call
    assert chat(tools=[]).params.tools is None


def test_response_formats():
    assert chat(response_format={"type": "text"}).params.response_format is None
    assert chat(response_format={"type": "json_object"}).params.response_format.type == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    ).params.response_format
    assert (fmt.type, fmt.name, fmt.strict, json.loads(fmt.schema)) == ("json_schema", "thing", True, schema)


def test_n_logprobs_and_logit_bias():
    params = chat(n=3, logprobs=True, top_logprobs=20, logit_bias={"7": -100, "3": 2.5}).params
    assert (params.n, params.logprobs, params.top_logprobs) == (3, True, 20)
    assert params.logit_bias == ((3, 2.5), (7, -100.0))
    completion = parse_completion_request({"prompt": "x", "logprobs": 0, "n": 2}).params
    assert (completion.logprobs, completion.top_logprobs, completion.n) == (True, 0, 2)
    assert chat(logprobs=False).params.logprobs is False


def test_conversations_with_tool_calls_and_tool_results_are_accepted():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    request = parse_chat_request({"messages": messages, "tools": [WEATHER]}, max_messages=8)
    assert request.messages[1]["tool_calls"] == [call] and request.messages[2]["tool_call_id"] == "call_1"
