from tripod.engines.text import StopMatcher


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
