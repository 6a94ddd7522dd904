"""Structured outputs on both engines and the real tiny model: sampled replies are valid for their schema, and end."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from tripod.engines.grammar import (
    ModelGrammars,
    request_grammar,
    response_format_grammar,
    unpack_bits,
    validate_grammar_text,
    validate_response_format,
)
from tripod.errors import InvalidRequest
from tripod.protocol import ResponseFormat, SamplingParams, Tool, ToolUse

MESSAGES = [{"role": "user", "content": "Describe a river as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string"},
        "depth": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["colour", "depth"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = ResponseFormat("json_schema", json.dumps(SCHEMA), name="river")
TOOL = Tool(
    "get_weather",
    parameters=json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
)


class TaggedCalls:
    """A stand-in for a model family's tool-call format (tripod/engines/tool_calls.py, another module's work):
    ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, its JSON compact as the response_format grammar's."""

    def call_grammar(self, tools: ToolUse, tokenizer=None) -> str:
        tool = tools.tools[0]
        schema = {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": json.loads(tool.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
            "x-guidance": {"whitespace_flexible": False},
        }
        return f'start: "<tool_call>" call "</tool_call>"\ncall: %json {json.dumps(schema)}\n'


@pytest.fixture(params=["hf", "hf-cb"])
def model(request):
    return request.getfixturevalue("chat_model" if request.param == "hf" else "cb_model")


def replies(model, params: list[SamplingParams]) -> list[tuple[str, str | None, int]]:
    """(text, finish reason, completion tokens) of each request, all running at once."""

    def run(sampling: SamplingParams) -> tuple[str, str | None, int]:
        stream = model.start(MESSAGES, sampling)
        text = "".join(delta.text for delta in stream)
        return text, stream.finish_reason, stream.completion_tokens

    with ThreadPoolExecutor(max_workers=len(params)) as pool:
        return list(pool.map(run, params))


def test_formats_and_grammars_are_checked_without_a_tokenizer():
    assert validate_response_format(SCHEMA_FORMAT) is None
    assert validate_response_format(ResponseFormat("json_object")) is None
    assert "Invalid type" in validate_response_format(ResponseFormat("json_schema", '{"type": "colour"}'))
    assert "not valid JSON" in validate_response_format(ResponseFormat("json_schema", '{"type": '))
    assert validate_grammar_text(TaggedCalls().call_grammar(ToolUse((TOOL,), choice="required"))) is None
    assert "unknown name" in validate_grammar_text('start: "a" missing_rule')


def test_the_request_grammar_is_its_format_else_a_forced_call():
    auto = ToolUse((TOOL,))
    forced = ToolUse((TOOL,), choice="function", function="get_weather")
    assert request_grammar(SamplingParams(), TaggedCalls()) is None
    assert request_grammar(SamplingParams(tools=auto), TaggedCalls()) is None
    both = SamplingParams(tools=auto, response_format=SCHEMA_FORMAT)
    assert request_grammar(both, TaggedCalls()) == response_format_grammar(SCHEMA_FORMAT)
    assert "<tool_call>" in request_grammar(SamplingParams(tools=forced), TaggedCalls())
    with pytest.raises(InvalidRequest) as info:
        request_grammar(SamplingParams(tools=forced), None)
    assert info.value.param == "tool_choice"


def test_the_json_grammar_allows_no_whitespace_between_tokens(chat_model):
    """vLLM's xgrammar let a reply run on in whitespace (``{\\r  "colour":\\r\\r ...``) until max_tokens: here no
    token that starts with whitespace is allowed anywhere outside a string."""
    vocab_size = chat_model.model.config.vocab_size
    grammars = ModelGrammars(chat_model.tokenizer, vocab_size, chat_model.eos_ids)
    matcher = grammars.matcher(response_format_grammar(SCHEMA_FORMAT), max_tokens=1000)
    starts_blank = [bool(piece) and piece[:1].isspace() for piece in grammars.pieces]
    bitmask = grammars.bitmask(1)
    for token in chat_model.tokenizer.encode('{"colour":"deep blue","depth":12}', add_special_tokens=False):
        matcher.mask(bitmask, 0)
        allowed = unpack_bits(bitmask, vocab_size)[0].tolist()
        if not matcher.in_string:
            assert not any(a and blank for a, blank in zip(allowed, starts_blank, strict=True))
        assert allowed[token]
        matcher.consume(token)
    assert matcher.done


@pytest.mark.parametrize("max_tokens", [40, 64])
def test_sampled_replies_are_valid_for_the_schema(model, max_tokens):
    """The random tiny model at temperature 1 writes strings until the budget nearly ends: the closing guard must
    still finish every reply as JSON valid for the schema, ended by the model (finish_reason "stop")."""
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, response_format=SCHEMA_FORMAT)
        for seed in range(6)
    ]
    for text, finish_reason, tokens in replies(model, params):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finish_reason == "stop" and tokens <= max_tokens


def test_json_object_replies_are_objects(model):
    fmt = ResponseFormat("json_object")
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=seed, response_format=fmt) for seed in range(3)]
    params.append(SamplingParams(max_tokens=40, temperature=0, response_format=fmt))
    for text, finish_reason, _ in replies(model, params):
        assert isinstance(json.loads(text), dict) and finish_reason == "stop"


def test_a_complete_grammar_ends_the_reply_with_stop(model):
    """Once the object closes only end-of-sequence is allowed: the reply ends there, far inside its budget."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    fmt = ResponseFormat("json_schema", json.dumps(schema))
    [(text, finish_reason, tokens)] = replies(
        model, [SamplingParams(max_tokens=500, temperature=1.0, seed=5, response_format=fmt)]
    )
    assert json.loads(text) in ({"ok": True}, {"ok": False})
    assert finish_reason == "stop" and tokens < 20


def test_a_forced_tool_call_follows_the_tool_format(model):
    """The tiny model's own format (Hermes): its markers are added tokens, which the grammar names by id."""
    forced = ToolUse((TOOL,), choice="required")
    params = [SamplingParams(max_tokens=48, temperature=1.0, seed=seed, tools=forced) for seed in range(3)]
    for text, finish_reason, _ in replies(model, params):
        assert text.startswith("<tool_call>") and text.endswith("</tool_call>"), text
        call = json.loads(text[len("<tool_call>") : -len("</tool_call>")].strip())
        assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)
        assert finish_reason == "stop"


def test_both_engines_constrain_alike(chat_model, cb_model):
    params = [SamplingParams(max_tokens=48, temperature=0, response_format=SCHEMA_FORMAT)]
    assert replies(chat_model, params) == replies(cb_model, params)
