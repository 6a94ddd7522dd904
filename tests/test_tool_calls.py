"""Tool calls in the model's text: each format parses the same however the reply is chunked, and its grammar
forces exactly a call block, checked by llguidance on the real tiny model's tokenizer."""

from __future__ import annotations

import json
import random
import re

import llguidance.hf
import pytest
from llguidance import LLMatcher

from tripod.engines.text import IncrementalDetokenizer
from tripod.engines.tiny import CHAT_TEMPLATE
from tripod.engines.tool_calls import (
    HERMES,
    LLAMA3,
    MISTRAL,
    ToolCallParser,
    detect_format,
    tool_call_format,
)
from tripod.protocol import Tool, ToolUse

WEATHER = Tool(
    "get_weather",
    "The weather in a city now.",
    json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
            "additionalProperties": False,
        }
    ),
)
ADD = Tool(
    "add",
    "a + b",
    json.dumps({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}),
)
TOOLS = ToolUse(tools=(WEATHER, ADD))

PARIS = '{"city": "Paris"}'
NESTED = '{"a": [1, {"b": "}]\\" <tool_call> [TOOL_CALLS] ;"}], "c": {"d": null}}'

# (format, reply, content, [(name, arguments)]): single and parallel calls, content around them.
CASES = [
    (
        HERMES,
        f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>',
        "",
        [("get_weather", PARIS)],
    ),
    (
        HERMES,
        f'Let me check.\n\n<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>\n'
        f'<tool_call>\n{{"name":"add","arguments":{NESTED}}}\n</tool_call>\nDone <tools> <tool s>',
        "Let me check.\nDone <tools> <tool s>",
        [("get_weather", PARIS), ("add", NESTED)],
    ),
    (
        HERMES,
        "No call: <tool_call>\n[1, 2]</tool_call> and <tool",
        "No call: <tool_call>\n[1, 2]</tool_call> and <tool",
        [],
    ),
    (LLAMA3, f'{{"name": "get_weather", "parameters": {PARIS}}}', "", [("get_weather", PARIS)]),
    (
        LLAMA3,
        f'<|python_tag|>{{"name": "get_weather", "parameters": {PARIS}}}; {{"name": "add", "arguments": {NESTED}}}',
        "",
        [("get_weather", PARIS), ("add", NESTED)],
    ),
    (LLAMA3, '  {"name": "Paris", "country": "France"}', '  {"name": "Paris", "country": "France"}', []),
    (
        LLAMA3,
        'JSON looks like {"name": "add", "parameters": {}}',
        'JSON looks like {"name": "add", "parameters": {}}',
        [],
    ),
    (MISTRAL, f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}]', "", [("get_weather", PARIS)]),
    (
        MISTRAL,
        f'Sure. [TOOL_CALLS] [{{"name": "get_weather", "arguments": {PARIS}}},\n'
        f' {{"name": "add", "arguments": {NESTED}}}] [TOOL_CALL] [TOOLS]',
        "Sure. [TOOL_CALL] [TOOLS]",
        [("get_weather", PARIS), ("add", NESTED)],
    ),
]


def parse(fmt, chunks: list[str], tool_use: ToolUse = TOOLS) -> tuple[str, list[tuple[str, str]], list]:
    """Feed ``chunks`` and flush; the content, each call's (name, arguments) and every piece, in order."""
    parser = ToolCallParser(fmt, tool_use)
    content, pieces = [], []
    for chunk in chunks:
        text, new = parser.feed(chunk)
        content.append(text)
        pieces.extend(new)
    text, new = parser.flush()
    content.append(text)
    pieces.extend(new)
    calls: dict[int, list[str]] = {}
    for piece in pieces:
        call = calls.setdefault(piece.index, ["", ""])
        call[0] += piece.name or ""
        call[1] += piece.arguments
    assert parser.called == bool(calls)
    return "".join(content), [tuple(calls[i]) for i in sorted(calls)], pieces


def splittings(text: str) -> list[list[str]]:
    """The same text cut every possible way we test: whole, every character, every 4, and at random."""
    cuts = [[text], list(text), [text[i : i + 4] for i in range(0, len(text), 4)]]
    for seed in range(8):
        rng = random.Random(seed)
        points = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        cuts.append([text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)])
    return cuts


@pytest.mark.parametrize(("fmt", "reply", "content", "calls"), CASES)
def test_each_format_parses_calls_the_same_however_the_reply_is_chunked(fmt, reply, content, calls):
    for chunks in splittings(reply):
        got_content, got_calls, _ = parse(fmt, chunks)
        assert (got_content, got_calls) == (content, calls), chunks
    for _, arguments in calls:
        json.loads(arguments)


FRAGMENTS = [
    *("<tool_call>", "</tool_call>", "<tool", "[TOOL_CALLS]", "[TOOL", "<|python_tag|>", "<|python"),
    *('{"name": ', '"add"', '"get_weather"', '"nope"', ', "arguments": ', ', "parameters": ', "{", "}", "[", "]"),
    *('"a"', ": ", "1", ", ", ";", '"\\"', '"}"', "\n", " ", "text", "\u00e9\u4e16"),
]


def fuzzed_reply(rng: random.Random) -> str:
    """Replies from CASES and loose fragments, spliced and cut at random: calls, broken calls and near-markers."""
    pieces = [rng.choice(CASES)[1] if rng.random() < 0.4 else rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 8))]
    reply = "".join(pieces)
    for _ in range(rng.randint(0, 3)):
        at = rng.randrange(len(reply) + 1)
        if rng.random() < 0.5:
            reply = reply[:at] + reply[at + rng.randint(1, 8) :]
        else:
            reply = reply[:at] + rng.choice(FRAGMENTS) + reply[at:]
    return reply or "x"


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL], ids=lambda fmt: fmt.name)
def test_any_text_at_all_parses_the_same_however_it_is_chunked(fmt):
    rng = random.Random(21)
    called = 0
    for _ in range(300):
        reply = fuzzed_reply(rng)
        whole = parse(fmt, [reply])[:2]
        called += bool(whole[1])
        for chunks in splittings(reply):
            assert parse(fmt, chunks)[:2] == whole, chunks
    assert called > 30  # the fuzzing reaches calls, not only content


def test_a_call_starts_with_its_id_and_name_and_then_streams_its_arguments():
    reply = f'<tool_call>\n{{"name": "add", "arguments": {NESTED}}}\n</tool_call>'
    _, _, pieces = parse(HERMES, list(reply))
    first, *rest = pieces
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", first.id) and first.name == "add" and first.arguments == ""
    assert all(p.index == 0 and p.id is None and p.name is None for p in rest)
    # Streamed as written, a piece per character fed, not one piece at the block's end.
    assert len(rest) == len(NESTED) and "".join(p.arguments for p in rest) == NESTED
    _, _, parallel = parse(HERMES, [CASES[1][1]])
    assert len({p.id for p in parallel if p.id}) == 2


def test_text_that_only_looks_like_a_marker_is_held_then_released():
    parser = ToolCallParser(HERMES, TOOLS)
    assert parser.feed("Hi <tool") == ("Hi", ())
    assert parser.feed("s>") == (" <tools>", ())
    assert parser.flush() == ("", ())
    parser = ToolCallParser(MISTRAL, TOOLS)
    assert parser.feed("a [TOOL") == ("a", ())
    assert parser.feed("S]") == (" [TOOLS]", ())


@pytest.mark.parametrize(
    ("fmt", "reply"),
    [
        (HERMES, '<tool_call>\n{"name": "get_weather", "argum'),  # cut short before the call is known
        (HERMES, '<tool_call>\n{"name": "send_email", "arguments": {"to": "x"}}\n</tool_call>'),  # not offered
        (HERMES, '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>'),  # name last
        (MISTRAL, '[TOOL_CALLS]{"name": "add", "arguments": {}}'),  # no list
        (LLAMA3, '{"name": "add", "parameters": "1, 2"}'),  # arguments not an object
    ],
)
def test_a_block_that_is_not_a_call_goes_out_as_content(fmt, reply):
    for chunks in splittings(reply):
        assert parse(fmt, chunks)[:2] == (reply, [])


def test_a_call_cut_short_keeps_its_arguments_so_far_and_drops_its_unfinished_markup():
    assert parse(HERMES, ['<tool_call>\n{"name": "add", "arguments": {"a": 1, "b"'])[:2] == (
        "",
        [("add", '{"a": 1, "b"')],
    )
    assert parse(HERMES, ['<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_'])[:2] == (
        "",
        [("add", '{"a": 1}')],
    )


def test_a_call_without_its_closing_markup_ends_where_content_starts_again():
    reply = '<tool_call>\n{"name": "add", "arguments": {"a": 1}} and so on'
    for chunks in splittings(reply):
        assert parse(HERMES, chunks)[:2] == (" and so on", [("add", '{"a": 1}')])


QWEN_SNIPPET = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}"
    '{{- "For each function call, return a json object within <tool_call></tool_call> XML tags" }}{%- endif %}'
)
LLAMA31_SNIPPET = (
    '{%- if builtin_tools is defined or tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}'
    "{%- if builtin_tools is defined %}{{- '<|python_tag|>' + tool_call.name + '.call(' }}{%- endif %}"
)
MISTRAL_SNIPPET = (
    '{%- if tools is not none %}{{- "[AVAILABLE_TOOLS] [" }}{%- endif %}'
    '{%- if message.tool_calls is defined %}{{- "[TOOL_CALLS] [" }}{%- endif %}'
)
CHATML = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"


def test_detect_format_reads_the_chat_template_or_takes_the_setting(chat_model):
    assert tool_call_format(chat_model.tokenizer) is HERMES
    assert detect_format(CHAT_TEMPLATE) is HERMES
    assert detect_format(QWEN_SNIPPET) is HERMES
    assert detect_format(LLAMA31_SNIPPET) is LLAMA3
    assert detect_format(MISTRAL_SNIPPET) is MISTRAL
    assert detect_format(CHATML) is None and detect_format(None) is None
    assert detect_format(CHATML, "mistral") is MISTRAL and detect_format(QWEN_SNIPPET, "llama3") is LLAMA3
    with pytest.raises(ValueError, match="hermes, llama3, mistral"):
        detect_format(QWEN_SNIPPET, "qwen")


def test_the_tiny_template_renders_tools_calls_and_tool_results(chat_model):
    tokenizer = chat_model.tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}},
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]
    tools = [WEATHER.as_template_tool(), ADD.as_template_tool()]
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert text.count("<|im_start|>system") == 1  # the system message went into the tools prompt
    assert "\n" + json.dumps(tools[0]) + "\n" + json.dumps(tools[1]) + "\n</tools>" in text
    assert (
        "<|im_start|>assistant\n"
        f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Rome"}}\n</tool_call><|im_end|>\n'
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    ) in text
    # The assistant's reply parses back into the calls it was rendered from.
    reply = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert parse(HERMES, [reply])[:2] == ("", [("get_weather", PARIS), ("get_weather", '{"city":"Rome"}')])
    # Without tools, plain ChatML as before.
    plain = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert plain == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"


def test_tool_call_markers_are_single_tokens_that_decoding_keeps(chat_model):
    tokenizer = chat_model.tokenizer
    text = '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<tool_call>") and ids[-1] == tokenizer.convert_tokens_to_ids(
        "</tool_call>"
    )
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(detokenizer.add([i]) for i in ids) + detokenizer.flush() == text


@pytest.fixture(scope="module")
def ll_tokenizer(chat_model):
    return llguidance.hf.from_tokenizer(chat_model.tokenizer)


def matches(grammar: str, text: str, tokenizer, ll_tokenizer) -> bool:
    matcher = LLMatcher(ll_tokenizer, grammar, log_level=0)
    ok = matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
    return ok and not matcher.is_error() and matcher.is_accepting()


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL], ids=lambda fmt: fmt.name)
def test_call_grammar_accepts_exactly_the_forced_calls(fmt, chat_model, ll_tokenizer):
    tokenizer = chat_model.tokenizer
    paris = fmt.call_text("get_weather", '{"city":"Paris","unit":"C"}')
    add = fmt.call_text("add", '{"a":1,"b":2}')

    def block(*calls: str) -> str:
        return fmt.grammar_open + fmt.grammar_separator.join(calls) + fmt.grammar_close

    forced = ToolUse(tools=TOOLS.tools, choice="function", function="get_weather")
    required = ToolUse(tools=TOOLS.tools, choice="required", parallel=False)
    parallel = ToolUse(tools=TOOLS.tools, choice="required")
    grammars = {use: fmt.call_grammar(use, tokenizer) for use in (forced, required, parallel)}
    for use, grammar in grammars.items():
        assert LLMatcher.validate_grammar(grammar, ll_tokenizer) == ""
        assert LLMatcher.validate_grammar(fmt.call_grammar(use), ll_tokenizer) == ""

    def accepts(use, text):
        return matches(grammars[use], text, tokenizer, ll_tokenizer)

    assert accepts(forced, block(paris)) and accepts(forced, block(fmt.call_text("get_weather", '{"city":"Rome"}')))
    assert not accepts(forced, block(add))  # another function
    assert not accepts(forced, block(fmt.call_text("get_weather", '{"unit":"C"}')))  # required argument missing
    assert not accepts(forced, block(fmt.call_text("get_weather", '{"city":"Paris","x":1}')))  # not in the schema
    assert not accepts(forced, block(fmt.call_text("get_weather", '{"city": "Paris"}')))  # free whitespace
    assert not accepts(forced, block(paris, paris))  # exactly one call
    assert not accepts(forced, "Sure. " + block(paris))  # nothing but the call
    assert accepts(required, block(add)) and accepts(required, block(paris))
    assert not accepts(required, block(add, paris))
    assert accepts(parallel, block(add, paris, add)) and accepts(parallel, block(paris))
    assert not accepts(parallel, "")
    if fmt is HERMES:  # the tiny model's <tool_call> is an added token, which llguidance takes for no text
        for marker in fmt.markers:
            assert f"<[{tokenizer.convert_tokens_to_ids(marker)}]>" in grammars[forced]
        assert not matches(fmt.call_grammar(forced), block(paris), tokenizer, ll_tokenizer)
    # What the grammar forces, the parser reads back as the same calls.
    assert parse(fmt, list(block(add, paris)))[:2] == (
        "",
        [("add", '{"a":1,"b":2}'), ("get_weather", '{"city":"Paris","unit":"C"}')],
    )
