"""Chunk rendering: the fast delta JSON is byte for byte what rendering the whole chunk gives."""

from __future__ import annotations

import json

import pytest

from tripod.responses import ChunkBuilder, compact_json

TEXTS = ["Hello", ", ", 'a "quoted" word', "line\nbreak\t", "naïve ☃ 😀", "\\", "", "</script>", "\x00"]


def rendered_both_ways(kind: str, model: str, include_usage: bool) -> tuple[list[str], list[str]]:
    fast, slow = ChunkBuilder(kind, model, include_usage), ChunkBuilder(kind, model, include_usage)
    slow.id, slow.created = fast.id, fast.created
    return [fast.delta_json(t) for t in TEXTS], [compact_json(slow.delta(t)) for t in TEXTS]


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_delta_json_is_the_compact_json_of_the_delta_chunk(kind, include_usage):
    fast, slow = rendered_both_ways(kind, "tiny", include_usage)
    assert fast == slow
    assert [json.loads(f)["choices"][0] for f in fast][-3:] == [json.loads(s)["choices"][0] for s in slow][-3:]
    if kind == "chat":
        assert json.loads(fast[0])["choices"][0]["delta"]["role"] == "assistant"
        assert "role" not in json.loads(fast[1])["choices"][0]["delta"]


@pytest.mark.parametrize("model", ["\x00tripod-delta-text\x00", "odd\x00tripod-delta-text\x00model"])
def test_a_model_name_like_the_marker_still_renders_right(model):
    fast, slow = rendered_both_ways("chat", model, False)
    assert fast == slow
