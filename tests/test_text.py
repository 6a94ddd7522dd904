import random
from pathlib import Path

import pytest

from tripod.engines.text import IncrementalDetokenizer, StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.feed(piece) for piece in pieces)
    return out + matcher.flush()


def test_stop_inside_one_piece_is_cut_and_not_emitted():
    matcher = StopMatcher(("END",))
    assert feed_all(matcher, ["hello END world"]) == "hello "
    assert matcher.stopped


def test_stop_split_across_pieces_is_never_emitted_in_part():
    matcher = StopMatcher(("STOP",))
    emitted = [matcher.feed(p) for p in ["abc S", "T", "O", "P tail"]]
    assert emitted == ["abc ", "", "", ""]
    assert matcher.stopped


def test_held_back_prefix_is_released_when_it_was_not_a_stop():
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("abc ST") == "abc "
    assert matcher.feed("ar") == "STar"
    assert matcher.flush() == ""
    matcher = StopMatcher(("STOP",))
    assert feed_all(matcher, ["abc ST"]) == "abc ST"
    assert not matcher.stopped


def test_earliest_of_several_stops_wins():
    matcher = StopMatcher(("b", "xyz"))
    assert feed_all(matcher, ["axyzb"]) == "a"


def test_no_stops_passes_text_through():
    matcher = StopMatcher(())
    assert feed_all(matcher, ["a", "b"]) == "ab"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tripod.engines.tiny import ensure_tiny_model

    return AutoTokenizer.from_pretrained(ensure_tiny_model(Path.home() / ".cache" / "tripod"))


@pytest.mark.parametrize("native", [True, False], ids=["decode-stream", "python-decode"])
def test_incremental_pieces_join_to_the_full_decode_whatever_the_split(tokenizer, native):
    rng = random.Random(7)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(600)]
    # Byte-fallback pieces of one multi-byte character, split across steps, end the text: flush must release them.
    ids += tokenizer.encode("naïve 🙂", add_special_tokens=False)[:-1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    if not native:
        detokenizer._stream = None
    assert (detokenizer._stream is not None) == native
    pieces, at = [], 0
    while at < len(ids):
        size = rng.choice([1, 1, 1, 2, 5])
        pieces.append(detokenizer.add(ids[at : at + size]))
        at += size
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])
