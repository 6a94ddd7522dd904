"""One reply with tool calls replayed at every chunking through the whole output path (the tool-call parser, the
chunk builder) into the ``openai`` SDK's own stream accumulator: the accumulated message is the non-streamed one.

vLLM's and SGLang's tool-call streaming breaks when one delta carries several tokens; the worker merges tokens into
deltas by its load (``TRIPOD_STREAM_INTERVAL``), so every chunking must give the same calls.
"""

from __future__ import annotations

import json
import random

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from tripod.engines.base import Delta
from tripod.engines.tool_calls import HERMES, ToolCallParser
from tripod.protocol import Tool, ToolUse
from tripod.responses import ChunkBuilder, ReplyText

TOOLS = ToolUse((Tool("get_weather"), Tool("add")))
REPLY = (
    "Let me check. "
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "}"}]}}\n</tool_call>'
)


def chunkings(pieces: list[str]):
    yield "every token", [[p] for p in pieces]
    for size in (2, 3, 4, 7):
        yield f"{size} tokens", [pieces[i : i + size] for i in range(0, len(pieces), size)]
    yield "all at once", [pieces]
    for seed in range(5):
        rng, chunks, i = random.Random(seed), [], 0
        while i < len(pieces):
            step = rng.randint(1, 6)
            chunks.append(pieces[i : i + step])
            i += step
        yield f"random {seed}", chunks


def replay(chunks: list[list[str]]) -> tuple[dict, dict]:
    """The SDK's accumulated message from streaming ``chunks``, and the non-streamed message of the same deltas."""
    parser, builder, whole = ToolCallParser(HERMES, TOOLS), ChunkBuilder("chat", "tiny", False), ReplyText()
    state = ChatCompletionStreamState()
    deltas = []
    for chunk in chunks:
        text, calls = parser.feed("".join(chunk))
        deltas.append(Delta(text, len(chunk), (), calls))
    text, calls = parser.flush()
    deltas.append(Delta(text, 0, (), calls))
    for delta in deltas:
        whole.add(delta)
        if delta.text or delta.tool_calls:
            state.handle_chunk(ChatCompletionChunk.model_validate(json.loads(builder.render(delta))))
    reason = "tool_calls" if parser.called else "stop"
    state.handle_chunk(ChatCompletionChunk.model_validate(builder.finish(reason)))
    streamed = state.get_final_completion().choices[0]
    answer = whole.completion("chat", model="tiny", finish_reasons=[reason], usage=None)["choices"][0]
    return streamed, answer


@pytest.fixture(scope="module")
def pieces(chat_model) -> list[str]:
    """REPLY as the tiny model's tokens would stream it: one text piece per token."""
    tokenizer = chat_model.tokenizer
    ids = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    texts = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    out = [texts[0]] + [texts[i][len(texts[i - 1]) :] for i in range(1, len(texts))]
    assert "".join(out) == REPLY
    return out


def test_every_chunking_accumulates_to_the_non_streamed_message(pieces):
    seen = set()
    for name, chunks in chunkings(pieces):
        streamed, answer = replay(chunks)
        calls = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]
        expected = [(c["function"]["name"], c["function"]["arguments"]) for c in answer["message"]["tool_calls"]]
        assert calls == expected, name
        assert [json.loads(arguments) for _, arguments in calls] == [
            {"city": "Oslo", "unit": "celsius"},
            {"a": 1, "b": [2, {"c": "}"}]},
        ], name
        assert (
            (streamed.message.content or "").strip()
            == (answer["message"]["content"] or "").strip()
            == ("Let me check.")
        ), name
        assert streamed.finish_reason == "tool_calls"
        assert all(c.id.startswith("call_") and c.type == "function" for c in streamed.message.tool_calls)
        seen.add(tuple(calls))
    assert len(seen) == 1
