import pytest

from tripod.errors import InvalidRequest
from tripod.protocol import parse_chat_request, parse_completion_request


def chat(**body):
    return parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **body}, max_messages=8)


def rejects(param: str, **body):
    with pytest.raises(InvalidRequest) as info:
        chat(**body)
    assert info.value.param == param, info.value.message
    return info.value


def test_defaults_follow_openai():
    request = chat()
    assert request.params.temperature == 1.0
    assert request.params.top_p == 1.0
    assert request.params.max_tokens is None
    assert not request.stream


def test_a_vanishing_temperature_is_greedy():
    assert chat(temperature=1e-50).params.greedy and not chat(temperature=0.01).params.greedy


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=5, max_completion_tokens=7).params.max_tokens == 7


@pytest.mark.parametrize(
    ("param", "body"),
    [
        ("max_tokens", {"max_tokens": -1}),
        ("max_tokens", {"max_tokens": 0}),
        ("max_tokens", {"max_tokens": 1 << 40}),
        ("max_tokens", {"max_tokens": "10"}),
        ("max_tokens", {"max_tokens": True}),
        ("temperature", {"temperature": 3}),
        ("temperature", {"temperature": "hot"}),
        ("top_p", {"top_p": 1.5}),
        ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
        ("stop", {"stop": [1]}),
        ("stop", {"stop": ""}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("frequency_penalty", {"frequency_penalty": "x"}),
        ("seed", {"seed": 1.5}),
        ("stream_options", {"stream_options": {"include_usage": True}}),
        ("bogus", {"bogus": 1}),
    ],
)
def test_bad_parameters_name_the_field(param, body):
    rejects(param, **body)


@pytest.mark.parametrize(
    ("param", "messages"),
    [
        ("messages", None),
        ("messages", []),
        ("messages", "hi"),
        ("messages[0]", ["hi"]),
        ("messages[0].role", [{"role": "wizard", "content": "hi"}]),
        ("messages[0].role", [{"role": {}, "content": "hi"}]),
        ("messages[0].role", [{"role": ["user"], "content": "hi"}]),
        ("messages[1].content", [{"role": "user", "content": "hi"}, {"role": "user"}]),
        ("messages[0].content", [{"role": "user", "content": 5}]),
        ("messages[0].content[0]", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        ("messages[0].tool_call_id", [{"role": "tool", "content": "42"}]),
        ("messages[0].tool_calls", [{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]),
    ],
)
def test_bad_messages_name_the_field(param, messages):
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request({"messages": messages}, max_messages=8)
    assert info.value.param == param


def test_too_many_messages():
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request({"messages": [{"role": "user", "content": "x"}] * 9}, max_messages=8)
    assert info.value.code == "too_many_messages"


def test_all_roles_in_any_order_and_content_parts():
    request = parse_chat_request(
        {
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "developer", "content": "be brief"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ]
        },
        max_messages=8,
    )
    assert [m["role"] for m in request.messages] == ["user", "system", "assistant", "tool", "system"]
    assert request.messages[4]["content"] == "ab"


def test_seed_is_reduced_to_63_bits_and_stop_accepts_a_string():
    request = chat(seed=(1 << 64) - 1, stop="END")
    assert request.params.seed == ((1 << 64) - 1) % (1 << 63)
    assert request.params.stop == ("END",)


def test_completion_defaults_to_16_tokens_and_needs_a_prompt():
    assert parse_completion_request({"prompt": "x"}).params.max_tokens == 16
    assert parse_completion_request({"prompt": ["x"]}).prompt == "x"
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request({"prompt": [1, 2, 3]})
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequest):
        parse_completion_request({})
