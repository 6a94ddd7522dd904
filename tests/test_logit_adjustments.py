"""logit_bias, penalties and logprobs on both engines and the real tiny model; on hf-cb, only the rows that ask."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
import torch

from tripod.engines.hf_cb_adjustments import BatchAdjustments, RequestAdjustments
from tripod.engines.hf_cb_sampling import RequestSampling, run_adjusted_batches_eagerly
from tripod.engines.logprobs import TokenTexts
from tripod.errors import InvalidRequest
from tripod.protocol import ResponseFormat, SamplingParams

MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]


@pytest.fixture(params=["hf", "hf-cb"])
def model(request):
    return request.getfixturevalue("chat_model" if request.param == "hf" else "cb_model")


def generation(model, **params):
    """The raw generation's deltas (logprobs included: the shared text layer is not under test here), its token
    ids and the generation itself."""
    raw, _ = model._start_raw(MESSAGES, SamplingParams(**params))
    try:
        deltas = list(raw)
    finally:
        raw.close()
    detokenizer = raw.streamer.detokenizer if model.engine == "hf" else raw.detokenizer
    return deltas, list(detokenizer.tokens), raw


def text_of(model, **params) -> str:
    return "".join(delta.text for delta in generation(model, **params)[0])


def token_id(model, text: str) -> int:
    [token] = model.tokenizer.encode(text, add_special_tokens=False)
    return token


def test_a_bias_of_100_makes_every_token_that_token(model):
    value = token_id(model, " value")
    _, tokens, _ = generation(
        model, max_tokens=12, temperature=1.0, seed=3, ignore_eos=True, logit_bias=((value, 100.0),)
    )
    assert tokens == [value] * 12


def test_a_bias_of_minus_100_bans_a_token(model):
    _, plain, _ = generation(model, max_tokens=24, temperature=0, ignore_eos=True)
    banned = max(set(plain), key=plain.count)
    _, tokens, _ = generation(model, max_tokens=24, temperature=0, ignore_eos=True, logit_bias=((banned, -100.0),))
    assert banned not in tokens and len(tokens) == 24


def test_a_logit_bias_outside_the_vocabulary_is_refused(model):
    with pytest.raises(InvalidRequest) as info:
        vocab_size = model.model.config.vocab_size
        model._start_raw(MESSAGES, SamplingParams(max_tokens=4, logit_bias=((5, 1.0), (vocab_size, 1.0))))
    assert info.value.param == "logit_bias"


def test_penalties_on_hf_cb_are_hf_s(chat_model, cb_model):
    """Sampling noise differs between the engines (a torch generator on hf, a counter-based hash on hf-cb), so only
    greedy replies match across them; penalised greedy replies must match as the plain ones do."""
    penalties = {"frequency_penalty": 2.0, "presence_penalty": 1.5}
    plain = text_of(cb_model, max_tokens=30, temperature=0, ignore_eos=True)
    penalised = text_of(cb_model, max_tokens=30, temperature=0, ignore_eos=True, **penalties)
    assert penalised != plain
    assert penalised == text_of(chat_model, max_tokens=30, temperature=0, ignore_eos=True, **penalties)
    negative = {"frequency_penalty": -2.0}  # repeats encouraged
    assert text_of(cb_model, max_tokens=30, temperature=0, **negative) == text_of(
        chat_model, max_tokens=30, temperature=0, **negative
    )


def test_logprobs_are_the_model_s_own_one_per_token(model):
    """Each token's logprob is the raw model's (before the penalty and the bias that changed the choice), checked
    against one forward pass of the whole sequence (to float32 rounding: generation reads a cache, step by step); the
    top alternatives come sorted, the raw argmax first."""
    bias = ((token_id(model, "ma"), -5.0),)
    deltas, tokens, raw = generation(
        model,
        max_tokens=16,
        temperature=0,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=5,
        frequency_penalty=1.0,
        logit_bias=bias,
    )
    logprobs = [entry for delta in deltas for entry in delta.logprobs]
    assert all(len(delta.logprobs) == delta.tokens for delta in deltas)
    assert len(logprobs) == len(tokens) == raw.completion_tokens == 16
    prompt = model.encode(MESSAGES)
    with torch.inference_mode():
        logits = model.model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    expected = torch.log_softmax(logits, dim=-1)
    texts = model.token_texts
    for k, (token, entry) in enumerate(zip(tokens, logprobs, strict=True)):
        assert (entry.token, entry.bytes) == texts[token]
        assert entry.logprob == pytest.approx(float(expected[k, token]), abs=5e-3)
        assert len(entry.top) == 5
        top_logprobs = [lp for _, _, lp in entry.top]
        assert top_logprobs == sorted(top_logprobs, reverse=True)
        assert entry.top[0][:2] == texts[int(expected[k].argmax())]
        assert top_logprobs[0] == pytest.approx(float(expected[k].max()), abs=5e-3)
    assert any(entry.token != entry.top[0][0] for entry in logprobs), "the penalty and bias never changed a choice"
    # The bytes are the reply's own, a stray byte the model wrote included (the text shows it as U+FFFD).
    replied = b"".join(bytes(entry.bytes) for entry in logprobs)
    assert replied.decode("utf-8", "replace") == "".join(d.text for d in deltas)


def test_logprobs_without_alternatives_and_plain_requests_without_logprobs(model):
    deltas, tokens, _ = generation(model, max_tokens=6, temperature=1.0, seed=2, ignore_eos=True, logprobs=True)
    assert [entry.top for delta in deltas for entry in delta.logprobs] == [()] * 6
    assert all(entry.logprob <= 0 for delta in deltas for entry in delta.logprobs)
    deltas, _, _ = generation(model, max_tokens=6, temperature=1.0, seed=2, ignore_eos=True)
    assert all(delta.logprobs == () for delta in deltas)


def test_a_split_character_has_its_real_bytes(chat_model):
    """A byte-level token holding part of a character decodes alone to a replacement character; its bytes are real."""
    texts = TokenTexts(chat_model.tokenizer, chat_model.grammars.tokenizer)
    ids = chat_model.tokenizer.encode("naïve 日本", add_special_tokens=False)
    assert b"".join(bytes(texts[token][1]) for token in ids) == "naïve 日本".encode()
    assert any(texts[token][0] == "\ufffd" for token in ids)
    eos = chat_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert texts[eos] == ("<|im_end|>", tuple(b"<|im_end|>"))


def test_plain_requests_keep_their_output_beside_adjusted_ones(cb_model, monkeypatch):
    """Adjusted rows are adjusted alone: greedy and seeded requests give what they give alone, and a batch of plain
    requests never reaches the adjustments at all."""
    adjusted_steps = []
    apply = BatchAdjustments.apply
    monkeypatch.setattr(BatchAdjustments, "apply", lambda self, scores: adjusted_steps.append(1) or apply(self, scores))
    plain = [{"temperature": 0}, {"temperature": 1.0, "seed": 7}, {"temperature": 0.8, "top_k": 40, "seed": 8}]
    alone = [text_of(cb_model, max_tokens=24, ignore_eos=True, **params) for params in plain]
    assert adjusted_steps == []
    adjusted = [
        {"temperature": 1.0, "seed": 1, "response_format": ResponseFormat("json_object")},
        {"temperature": 0, "frequency_penalty": 2.0, "logprobs": True, "top_logprobs": 3},
        {"temperature": 1.0, "seed": 7, "logit_bias": ((token_id(cb_model, " value"), 100.0),)},
    ]
    results: list[str] = [""] * 6
    barrier = threading.Barrier(6)

    def run(i: int) -> None:
        params = plain[i] if i < 3 else adjusted[i - 3]
        barrier.wait()
        results[i] = text_of(cb_model, max_tokens=24, ignore_eos=i < 3, **params)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[:3] == alone
    assert adjusted_steps, "the adjusted requests were never adjusted"
    assert isinstance(json.loads(results[3]), dict)
    assert results[5] == " value" * 24
    assert cb_model.manager.logit_processor.adjustments == {}, "a finished request left its adjustments behind"


class FakeRunner:
    """transformers' model runner as far as the forward choice goes: a captured graph for every step."""

    def _get_forward_fn(self, use_block_table):
        return "captured forward", True

    def _forward_process_and_sample(self, *args):
        pass


def test_under_cuda_graphs_an_adjusted_step_runs_uncaptured():
    """A grammar's mask is computed on the host between the forward and the sampling: a replayed graph would skip it.
    A CPU has no graphs, so this checks the choice of forward on a stand-in runner; steps without adjusted rows keep
    theirs."""
    runner = FakeRunner()
    manager = SimpleNamespace(_create_batch_processor=lambda: SimpleNamespace(model_runner=runner))
    sampling = RequestSampling(64, captured=True)
    run_adjusted_batches_eagerly(manager, sampling)
    manager._create_batch_processor()
    manager._create_batch_processor()  # a restarted loop reuses its processor: wrapped once
    assert runner._get_forward_fn(True) == ("captured forward", True)
    request = SimpleNamespace(has_new_token=True, state=SimpleNamespace(request_id="r", logit_processor_kwargs={}))
    sampling.adjustments["r"] = RequestAdjustments(SamplingParams(logprobs=True), None, "cpu")
    sampling.prepare_tensor_args([request], torch.zeros((4, 1), dtype=torch.int32))
    assert sampling.eager
    assert runner._get_forward_fn(True) == (runner._forward_process_and_sample, False)
    del sampling.adjustments["r"]
    sampling.prepare_tensor_args([request], torch.zeros((4, 1), dtype=torch.int32))
    assert not sampling.eager and runner._get_forward_fn(False) == ("captured forward", True)
