"""The transformers engine on the real tiny model: sampling, stops, usage, cancel, failures."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tripod import job_protocol as wire
from tripod.engines import ChatModel, get_chat_model
from tripod.errors import ContextLengthExceeded, EngineFailure
from tripod.protocol import SamplingParams

MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]


def text_of(model, **params) -> str:
    return model.generate(MESSAGES, **params)["choices"][0]["message"]["content"]


def test_contract_attributes(chat_model):
    assert chat_model.engine == "hf"
    assert chat_model.model_name == "tiny"
    assert chat_model.can_generate
    assert get_chat_model() is chat_model, "the factory shares one instance per model"
    assert isinstance(ChatModel(engine="hf", model_name="tiny"), type(chat_model))


def test_greedy_is_deterministic_and_usage_is_exact(chat_model):
    first = chat_model.generate(MESSAGES, max_tokens=12, temperature=0)
    second = chat_model.generate(MESSAGES, max_tokens=12, temperature=0)
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    assert first["choices"][0]["finish_reason"] == "length"
    prompt_ids = chat_model.encode(MESSAGES)
    assert first["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 12,
        "total_tokens": len(prompt_ids) + 12,
    }
    # The text is exactly the decoding of the generated tokens.
    ids = torch.tensor([prompt_ids])
    out = chat_model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    expected = chat_model.tokenizer.decode(out[0][len(prompt_ids) :], skip_special_tokens=True)
    assert first["choices"][0]["message"]["content"] == expected


def test_text_streams_token_by_token_and_matches_the_whole_reply(chat_model):
    stream = chat_model.stream(MESSAGES, max_tokens=20, temperature=0, ignore_eos=True)
    deltas = list(stream)
    assert stream.completion_tokens == 20 and sum(d.tokens for d in deltas) == 20
    assert sum(1 for d in deltas if d.text) >= 18
    whole = chat_model.generate(MESSAGES, max_tokens=20, temperature=0, ignore_eos=True)
    assert "".join(d.text for d in deltas) == whole["choices"][0]["message"]["content"]


def stream_tokens(tokenizer, ids: list[int]) -> list[tuple[str, int]]:
    """What ``generate`` would hand the hf engine's streamer for ``ids``, read back as its pieces."""
    from tripod.engines.hf import TokenStreamer

    streamer = TokenStreamer(tokenizer, set(), timeout=1.0)
    streamer.put(torch.tensor([[1, 2, 3]]))  # generate's first call: the prompt, not streamed
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    pieces = [(text, tokens) for text, tokens, _ in streamer]  # no recorder: no logprob picks
    assert sum(tokens for _, tokens in pieces) == len(ids) == streamer.generated
    return pieces


def test_punctuation_is_not_held_back_to_a_word_end(chat_model):
    """transformers' TextIteratorStreamer holds text with punctuation until the next space: a stream of
    sampled symbols could stay silent longer than TRIPOD_EVENT_TIMEOUT. Every token's text goes out at once."""
    ids = chat_model.tokenizer.encode("a,b;c(d)e.f!g", add_special_tokens=False)
    pieces = stream_tokens(chat_model.tokenizer, ids)
    assert "".join(text for text, _ in pieces) == "a,b;c(d)e.f!g"
    assert len(pieces) == len(ids), pieces


def test_a_split_character_waits_for_its_last_byte(chat_model):
    """A character made of several byte tokens is sent whole, never as a replacement character."""
    ids = chat_model.tokenizer.encode("naïve 日本", add_special_tokens=False)
    pieces = stream_tokens(chat_model.tokenizer, ids)
    assert "".join(text for text, _ in pieces) == "naïve 日本"
    assert all("\ufffd" not in text for text, _ in pieces)
    assert len(pieces) < len(ids)  # the byte tokens of one character arrive as one piece


def test_same_seed_same_output_even_when_requests_overlap(chat_model):
    alone = text_of(chat_model, max_tokens=24, temperature=1.0, seed=7)
    assert alone == text_of(chat_model, max_tokens=24, temperature=1.0, seed=7)
    assert alone != text_of(chat_model, max_tokens=24, temperature=1.0, seed=8)
    results: list[str] = [""] * 4

    def run(i: int) -> None:
        results[i] = text_of(chat_model, max_tokens=24, temperature=1.0, seed=7 if i % 2 == 0 else 100 + i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == alone and results[2] == alone


def test_stop_sequence_is_not_emitted_and_finish_reason_is_stop(chat_model):
    full = text_of(chat_model, max_tokens=40, temperature=0.8, seed=3)
    stop = full[12:16]
    cut = full[: full.index(stop)]
    response = chat_model.generate(MESSAGES, max_tokens=40, temperature=0.8, seed=3, stop=[stop, "never-seen"])
    assert response["choices"][0]["message"]["content"] == cut
    assert response["choices"][0]["finish_reason"] == "stop"
    assert response["usage"]["completion_tokens"] < 40


def test_penalties_change_the_output_as_openai_defines(chat_model):
    plain = text_of(chat_model, max_tokens=30, temperature=0)
    penalised = text_of(chat_model, max_tokens=30, temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    assert plain != penalised
    plain_tokens = chat_model.tokenizer(plain)["input_ids"]
    penalised_tokens = chat_model.tokenizer(penalised)["input_ids"]
    # Penalising repeats gives more distinct tokens.
    assert len(set(penalised_tokens)) > len(set(plain_tokens))


def test_cancel_stops_the_engine_within_one_step(chat_model):
    stream = chat_model.stream(MESSAGES, max_tokens=1500, ignore_eos=True)
    seen = 0
    for delta in stream:
        seen += delta.tokens
        if seen >= 3:
            stream.cancel()
    record = chat_model.history[-1]
    assert record.id == stream.id
    assert record.cancelled and stream.finish_reason is None
    assert record.steps_after_cancel == 1
    assert record.completion_tokens < 1500
    assert chat_model.active_generations == 0


def test_prompt_longer_than_the_context_is_refused(chat_model):
    long_text = "word " * (chat_model.context_length + 10)
    with pytest.raises(ContextLengthExceeded) as info:
        chat_model.stream([{"role": "user", "content": long_text}])
    assert info.value.param == "messages"
    with pytest.raises(ContextLengthExceeded) as info:
        chat_model.stream(MESSAGES, max_tokens=chat_model.context_length)
    assert info.value.param == "max_tokens"


def test_the_server_cap_bounds_an_open_ended_request_without_refusing_it(chat_model):
    long_prompt = [{"role": "user", "content": "word " * ((chat_model.context_length - 100) // 2)}]
    assert 0 < chat_model.context_length - len(chat_model.encode(long_prompt)) < 500
    stream = chat_model.start(long_prompt, SamplingParams(ignore_eos=True), max_tokens_cap=500)
    list(stream)
    assert 0 < stream.completion_tokens < 500, "the room left in the context wins over the cap"
    stream = chat_model.start(MESSAGES, SamplingParams(ignore_eos=True), max_tokens_cap=7)
    list(stream)
    assert stream.completion_tokens == 7


def test_a_crashing_generate_ends_the_stream_with_an_error(chat_model):
    def explode(*args, **kwargs):
        raise RuntimeError("injected fault")

    hook = chat_model.model.model.layers[0].register_forward_pre_hook(explode)
    try:
        started = time.monotonic()
        with pytest.raises(EngineFailure) as info:
            list(chat_model.stream(MESSAGES, max_tokens=5))
        assert "injected fault" in info.value.message
        assert time.monotonic() - started < 10
    finally:
        hook.remove()


def test_a_hung_generate_times_out_instead_of_hanging_the_reader(chat_model):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(30)

    hook = chat_model.model.model.layers[0].register_forward_pre_hook(hang)
    previous = chat_model.step_timeout
    chat_model.step_timeout = 0.5
    stream = None
    try:
        stream = chat_model.stream(MESSAGES, max_tokens=5)
        with pytest.raises(EngineFailure) as info:
            list(stream)
        assert info.value.code == "engine_timeout"
    finally:
        chat_model.step_timeout = previous
        hook.remove()
        release.set()
        if stream is not None:
            # The stuck thread was told to cancel; let it finish before the next test.
            stream.raw._thread.join(30)
            assert not stream.raw._thread.is_alive()


def test_sampling_params_round_trip_through_a_job_message():
    params = SamplingParams(max_tokens=3, stop=("a", "b"), seed=4, top_k=5)
    job = wire.Job(id="j", reply_channel="r", model="tiny", params=params, deadline=0.0, prompt="hi")
    assert wire.decode(wire.encode(job)).params == params
