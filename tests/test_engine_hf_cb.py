"""The continuous-batching engine on the real tiny model: same answers as ``hf``, per-request seeds, cancel."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing
from types import SimpleNamespace

import pytest
import torch

from tripod.engines import ChatModel, hf_cb_sampling
from tripod.engines.hf_cb_sampling import (
    RequestSampling,
    SamplingKeyedGraphs,
    key_graphs_by_sampling,
    noise_key,
    uniform_noise,
)
from tripod.errors import EngineFailure

MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]


def text_of(model, **params) -> str:
    return model.generate(MESSAGES, **params)["choices"][0]["message"]["content"]


def test_greedy_matches_the_hf_engine_with_exact_usage(cb_model, chat_model):
    ours = cb_model.generate(MESSAGES, max_tokens=24, temperature=0)
    reference = chat_model.generate(MESSAGES, max_tokens=24, temperature=0)
    assert ours["choices"][0]["message"] == reference["choices"][0]["message"]
    assert ours["usage"] == reference["usage"]
    assert ours["choices"][0]["finish_reason"] == "length"


def test_a_seed_reproduces_its_output_whatever_shares_the_batch(cb_model):
    alone = text_of(cb_model, max_tokens=24, temperature=1.0, seed=7)
    assert alone != text_of(cb_model, max_tokens=24, temperature=1.0, seed=8)
    results: list[str] = [""] * 8

    def run(i: int) -> None:
        seed = 7 if i % 2 == 0 else 1000 + i
        results[i] = text_of(cb_model, max_tokens=24 + i, temperature=1.0, seed=seed)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in (0, 2, 4, 6):
        assert results[i][: len(alone)] == alone
    assert len({results[i] for i in (1, 3, 5, 7)}) == 4


def run_mixed_batch(model) -> tuple[list[str], list[str]]:
    """Greedy, seeded, top-k and top-p requests in one batch: (what each got, what each should get)."""
    greedy = text_of(model, max_tokens=24, temperature=0)
    seeded = text_of(model, max_tokens=24, temperature=1.0, seed=7)
    assert seeded != greedy
    kinds = [
        ({"temperature": 0}, greedy),
        ({"temperature": 1.0, "seed": 7}, seeded),
        ({"temperature": 1.5, "top_k": 1, "seed": 11}, greedy),  # top-k 1 leaves only the argmax to sample
        ({"temperature": 0.7, "top_p": 1e-6, "seed": 12}, greedy),  # so does a tiny nucleus
    ]
    results: list[str] = [""] * 12
    barrier = threading.Barrier(len(results))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = text_of(model, max_tokens=24, **kinds[i % len(kinds)][0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, [kinds[i % len(kinds)][1] for i in range(len(results))]


def test_greedy_and_sampled_requests_in_one_batch_keep_their_own_outputs(cb_model):
    # Only the sampling rows of a batch run the processors: each row must still get its own request's arguments.
    results, expected = run_mixed_batch(cb_model)
    assert results == expected


@pytest.mark.parametrize("keyed", [True, False], ids=["chain-per-batch", "whole-chain"])
def test_the_branch_free_chain_of_a_captured_graph_gives_each_row_the_same(cb_model, monkeypatch, keyed):
    """Under a CUDA graph every row runs the chain, greedy rows with neutral arguments: same tokens as row by row.

    A CPU has no graphs, so this runs the graph's arithmetic eagerly; tripod/bench/gpu_checks.py runs it captured.
    """
    sampling = cb_model.manager.logit_processor
    monkeypatch.setattr(sampling, "captured", True)
    monkeypatch.setattr(sampling, "keyed_graphs", keyed)
    chains = set()
    call = RequestSampling.__call__
    monkeypatch.setattr(RequestSampling, "__call__", lambda self, *a: chains.add(self.chain) or call(self, *a))
    results, expected = run_mixed_batch(cb_model)
    assert results == expected
    # Greedy alone runs nothing; temperature 1 only the noise; top-k and top-p join when asked for.
    assert chains >= ({(), (3,), (0, 1, 2, 3)} if keyed else {(0, 1, 2, 3)})
    assert not keyed or chains <= {(), (3,), (0, 1, 3), (0, 2, 3), (0, 1, 2, 3)}


class FakeGraph:
    def reset(self) -> None:
        pass


def test_captured_graphs_are_kept_per_sampling_chain(cb_model, monkeypatch):
    """A greedy batch must not replay a graph captured with noise, nor the converse, at the same batch shape."""
    manager = cb_model.manager
    monkeypatch.setattr(manager, "_create_batch_processor", manager._create_batch_processor)
    sampling = RequestSampling(cb_model.vocab_size, captured=True)
    key_graphs_by_sampling(manager, sampling)
    processor = manager._create_batch_processor()  # what the loop thread calls when the manager starts
    graphs = processor.inputs_and_outputs.graphs
    assert isinstance(graphs, SamplingKeyedGraphs) and sampling.keyed_graphs
    noisy, greedy = FakeGraph(), FakeGraph()
    sampling.chain = (3,)
    graphs.set_graph((64, 1024), noisy)
    sampling.chain = ()
    assert graphs.get_graph((64, 1024)) is None
    graphs.set_graph((64, 1024), greedy)
    assert graphs.get_graph((64, 1024)) is greedy
    sampling.chain = (3,)
    assert graphs.get_graph((64, 1024)) is noisy
    del processor


def test_without_a_graph_store_to_key_the_whole_chain_runs(caplog):
    """A transformers whose inputs and outputs moved their graphs elsewhere: warn and stay right for any batch."""
    manager = SimpleNamespace(_create_batch_processor=lambda: SimpleNamespace(inputs_and_outputs=SimpleNamespace()))
    sampling = RequestSampling(64, captured=True)
    key_graphs_by_sampling(manager, sampling)
    manager._create_batch_processor()
    assert not sampling.keyed_graphs
    assert "cannot key CUDA graphs" in caplog.text
    request = SimpleNamespace(has_new_token=True, state=SimpleNamespace(logit_processor_kwargs={}))
    sampling.prepare_tensor_args([request], torch.zeros((4, 1), dtype=torch.int32))
    assert sampling.chain == (0, 1, 2, 3)


def test_sampling_streams_go_on_while_a_long_prompt_prefills_in_chunks(cb_model):
    """A prompt longer than a step (256 tokens on CPU) is prefilled over several steps, in batches with streams that
    sample. Its row in the step's scores is never read, and it used to get the sampling rows' processing: with two
    streams sampling (one alone broadcast), every sampling request in the batch failed with a tensor size mismatch."""
    seeds = (21, 22)
    alone = [text_of(cb_model, max_tokens=300, temperature=1.0, seed=seed, ignore_eos=True) for seed in seeds]
    sampled = [cb_model.stream(MESSAGES, max_tokens=300, temperature=1.0, seed=seed, ignore_eos=True) for seed in seeds]
    readers = [iter(stream) for stream in sampled]
    firsts = [next(reader).text for reader in readers]  # both decoding now
    long_prompt = [{"role": "user", "content": " ".join(f"river{i}" for i in range(300))}]
    long = cb_model.stream(long_prompt, max_tokens=4, temperature=0, ignore_eos=True)
    texts = [first + "".join(delta.text for delta in reader) for first, reader in zip(firsts, readers, strict=True)]
    assert texts == alone
    assert [stream.finish_reason for stream in sampled] == ["length", "length"]
    assert "".join(delta.text for delta in long) and long.finish_reason == "length"
    assert long.prompt_tokens > 2 * 256


def test_a_greedy_batch_runs_no_sampling_processor(cb_model, monkeypatch):
    calls = []
    for processor in cb_model.manager.logit_processor.logits_processor:
        cls = type(processor)
        monkeypatch.setattr(cls, "__call__", lambda *a, _f=cls.__call__, **k: calls.append(1) or _f(*a, **k))
    text_of(cb_model, max_tokens=4, temperature=0)
    assert calls == []
    text_of(cb_model, max_tokens=4, temperature=1.0, seed=1)
    assert calls


def test_grouped_heads_reach_the_attention_kernel_uncopied(cb_model, monkeypatch):
    # The tiny model has 4 query heads on 2 key/value heads: on CPU the kernel takes them grouped, with the mask.
    from transformers.integrations import sdpa_attention

    copies = []
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: copies.append(1) or a[0])
    assert cb_model.model.config.num_key_value_heads < cb_model.model.config.num_attention_heads
    text_of(cb_model, max_tokens=4, temperature=0)
    assert copies == []


def test_top_k_one_is_greedy(cb_model):
    assert text_of(cb_model, max_tokens=16, temperature=1.5, top_k=1, seed=3) == text_of(
        cb_model, max_tokens=16, temperature=0
    )


def test_stop_sequences_in_the_text_layer(cb_model):
    full = text_of(cb_model, max_tokens=40, temperature=0.8, seed=3)
    stop = full[12:16]
    response = cb_model.generate(MESSAGES, max_tokens=40, temperature=0.8, seed=3, stop=[stop])
    assert response["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert response["choices"][0]["finish_reason"] == "stop"


def test_cancel_removes_the_request_from_the_batch(cb_model):
    stream = cb_model.stream(MESSAGES, max_tokens=1800, ignore_eos=True)
    seen = 0
    for delta in stream:
        seen += delta.tokens
        if seen >= 3:
            stream.cancel()
    assert stream.finish_reason is None and cb_model.history[-1].cancelled
    scheduler = cb_model.manager.batch_processor.scheduler
    deadline = time.monotonic() + 5
    while scheduler.active_requests or scheduler.waiting_requests:
        assert time.monotonic() < deadline, "the cancelled request is still in the batch"
        time.sleep(0.01)
    assert stream.completion_tokens < 1800


def test_an_engine_failure_ends_the_stream_with_an_error(cb_model):
    def explode(*args, **kwargs):
        raise RuntimeError("injected CB fault")

    hook = cb_model.model.model.layers[0].register_forward_pre_hook(explode)
    try:
        with pytest.raises(EngineFailure):
            list(cb_model.stream(MESSAGES, max_tokens=5))
    finally:
        hook.remove()
    # The manager survives the failed batch and serves the next request.
    assert cb_model.generate(MESSAGES, max_tokens=3, temperature=0)["usage"]["completion_tokens"] == 3


def test_noise_is_a_pure_function_of_the_key():
    import torch

    keys = torch.tensor([noise_key(1, 0), noise_key(1, 1), noise_key(1, 0)], dtype=torch.int32)
    noise = uniform_noise(keys, 50)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert float(noise.min()) > 0 and float(noise.max()) < 1
    # Roughly uniform: the mean of many draws is near one half.
    many = uniform_noise(torch.arange(1, 2001, dtype=torch.int32), 100)
    assert abs(float(many.mean()) - 0.5) < 0.01


def test_the_batching_loop_never_keeps_a_process_alive(cb_model):
    # A non-daemon loop thread made `python -m tripod.bench --direct --engine hf-cb` (and daphne) hang at exit.
    assert cb_model.manager._generation_thread.daemon


def test_pushed_streams_equal_pulled_ones_and_wake_the_loop_once_per_step(cb_model):
    """Streams read on an event loop get each batch step's output in one wake-up of that loop, not one per stream."""
    prompts = [[{"role": "user", "content": f"Tell me about river number {i}."}] for i in range(6)]
    pulled = [
        "".join(d.text for d in cb_model.stream(p, max_tokens=20 + i, temperature=0)) for i, p in enumerate(prompts)
    ]
    steps_before = cb_model.manager.current_batch

    async def read_all() -> tuple[list[str], int, list]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        schedule = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            nonlocal wakeups
            wakeups += 1
            return schedule(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting

        async def read(stream) -> str:
            async with aclosing(stream.deltas_async()) as deltas:
                return "".join([delta.text async for delta in deltas])

        try:
            streams = [cb_model.stream(p, max_tokens=20 + i, temperature=0) for i, p in enumerate(prompts)]
            texts = await asyncio.gather(*(read(stream) for stream in streams))
        finally:
            del loop.call_soon_threadsafe
        return texts, wakeups, streams

    texts, wakeups, streams = asyncio.run(read_all())
    assert texts == pulled
    assert [s.finish_reason for s in streams] == ["length"] * 6
    assert [s.completion_tokens for s in streams] == [20 + i for i in range(6)]
    steps = cb_model.manager.current_batch - steps_before
    assert steps >= 25  # the longest stream's 25 tokens, and its prefill
    assert wakeups <= steps + 2, f"{wakeups} loop wake-ups for {steps} steps of 6 streams"


def test_a_seeded_request_keys_its_noise_by_each_token_index(cb_model, monkeypatch):
    """Token k's noise is keyed (seed, k), k counted from the prompt's end: the steps must not lag or repeat."""
    steps = []

    def recording_key(seed: int, step: int) -> int:
        if seed == 4242:
            steps.append(step)
        return noise_key(seed, step)

    monkeypatch.setattr(hf_cb_sampling, "noise_key", recording_key)
    result = cb_model.generate(MESSAGES, max_tokens=9, temperature=1.0, seed=4242, ignore_eos=True)
    assert result["usage"]["completion_tokens"] == 9
    assert steps == list(range(9))


def test_kv_padding_reaches_the_batching_config(chat_model):
    """``TRIPOD_CB_KV_PADDING`` is handed to transformers; 0 asks for transformers' own default."""
    own = ChatModel(engine="hf-cb", model_name="tiny", path=chat_model.tokenizer.name_or_path, cb_kv_padding=0)
    own.load()
    try:
        assert own.manager.continuous_batching_config.kv_padding_interval_size == 16384
        assert own.generate(MESSAGES, max_tokens=4, temperature=0)["usage"]["completion_tokens"] == 4
    finally:
        own.manager.stop(block=True)


def test_kv_padding_is_1024_by_default(cb_model):
    """Measured on an H100: 1.8x one stream's tokens per second against transformers' 16384 (docs/BENCHMARKS.md)."""
    assert cb_model.manager.continuous_batching_config.kv_padding_interval_size == 1024
    from tripod.conf import config

    assert config().cb_kv_padding == 1024


def test_the_engine_samples_the_governor_on_its_batching_thread(cb_model, monkeypatch):
    """On CPU, torch's pool follows the machine's load (tripod/engines/cpu_threads.py), asked before each step."""
    governor = cb_model.core_governor
    assert governor is not None, "on CPU with two cores and no OMP_NUM_THREADS, hf-cb governs torch's threads"
    threads = []
    monkeypatch.setattr(governor, "sample", lambda: threads.append(threading.current_thread().name) or 1)
    cb_model.generate(MESSAGES, max_tokens=4, temperature=0)
    assert threads and threading.main_thread().name not in threads


def test_on_cpu_a_step_takes_at_most_256_tokens_by_default(cb_model):
    """Prefill in small chunks: at 16 streams, first tokens came 30 % sooner than with 1024 (docs/BENCHMARKS.md)."""
    config = cb_model.manager.continuous_batching_config
    assert (config.num_blocks, config.max_batch_tokens) == (512, 256)


def test_packed_grouped_attention_equals_transformers_own():
    """``TRIPOD_CB_PACKED_GQA``: query heads stacked per key/value head, the mask repeated: the same attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tripod.patches.grouped_attention import packed_gqa_sdpa

    generator = torch.Generator().manual_seed(0)
    query, key, value = (
        torch.randn(1, heads, length, 16, generator=generator) for heads, length in ((8, 6), (2, 20), (2, 20))
    )
    mask = torch.full((1, 1, 6, 20), torch.finfo(torch.float32).min)
    for row, (start, end) in enumerate([(0, 4), (0, 5), (5, 12), (5, 13), (13, 19), (13, 20)]):
        mask[..., row, start:end] = 0  # three sequences of two query tokens each, as one block-diagonal batch
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    ours, _ = packed_gqa_sdpa(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (1, 6, 8, 16)
    torch.testing.assert_close(ours, theirs)
    unmasked, _ = packed_gqa_sdpa(module, query, key, value, None)  # what it does not pack goes to transformers
    torch.testing.assert_close(unmasked, sdpa_attention_forward(module, query, key, value, None)[0])


@pytest.mark.parametrize("chunk", [4, 5, 10])
def test_attention_with_split_keys_equals_the_whole(chunk, monkeypatch):
    """``TRIPOD_CB_SPLIT_KEYS``: chunks of keys as one batch, then a tail, weighed by their log-sum-exps: the same
    attention, for rows that span chunks, rows inside one and the tail; a row masked everywhere (a padded query
    token, whose output is dropped) stays finite, since the cache may take its keys and values."""
    from tripod.patches import grouped_attention
    from tripod.patches.grouped_attention import split_keys_sdpa

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, length, 16, generator=generator) for length in (6, 23, 23))
    mask = torch.full((1, 1, 6, 23), torch.finfo(torch.float32).min)
    for row, (start, end) in enumerate([(0, 9), (0, 10), (10, 12), (12, 23), (22, 23)]):
        mask[..., row, start:end] = 0  # row 5 sees nothing, as a padded query row may
    kernel = grouped_attention._kernel_with_lse

    def exact_shapes(query, key, value, mask, scale):
        # CUDA's kernel refuses a mask that only broadcasts (the H200 run: "attn_bias: wrong shape"); the CPU one
        # does not, so the test holds the CPU calls to CUDA's rule.
        assert mask.shape == (*query.shape[:3], key.shape[2])
        return kernel(query, key, value, mask, scale)

    monkeypatch.setattr(grouped_attention, "_kernel_with_lse", exact_shapes)
    ours = split_keys_sdpa(query, key, value, mask, 0.25, chunk)
    theirs = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.25)
    torch.testing.assert_close(ours[..., :5, :], theirs[..., :5, :])
    assert ours[..., 5, :].isfinite().all()


def test_split_keys_that_the_kernel_refuses_fall_back_to_whole_keys(monkeypatch, caplog):
    """Fault injection: the log-sum-exp kernel raises (as CUDA's did on the H200 for a mask it would not take); the
    step still gets its attention, from whole-key SDPA, and the process stops splitting."""
    from tripod.patches import grouped_attention

    def refusing(*args):
        raise RuntimeError("attn_bias: wrong shape (head dimension)")

    monkeypatch.setattr(grouped_attention, "attention_with_lse", refusing)
    monkeypatch.setattr(grouped_attention, "_split_keys", 4)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (
        torch.randn(1, heads, length, 16, generator=generator) for heads, length in ((4, 3), (2, 12), (2, 12))
    )
    mask = torch.zeros(1, 1, 3, 12)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    with caplog.at_level("WARNING", logger="tripod.patches.grouped_attention"):
        ours, _ = grouped_attention.packed_gqa_sdpa(module, query, key, value, mask)
    theirs = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ours, theirs.transpose(1, 2))
    assert grouped_attention._split_keys == 0
    assert "split keys turned off" in caplog.text


def test_the_engine_with_split_keys_gives_the_same_tokens(cb_model, chat_model, monkeypatch):
    """Routed through the packed path with chunks of 2 keys (the test routes it: on CPU the engine leaves it off)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from tripod.patches import grouped_attention

    reference = chat_model.generate(MESSAGES, max_tokens=24, temperature=0)
    split_calls = []
    split_keys_sdpa = grouped_attention.split_keys_sdpa

    def recording(query, key, value, mask, scale, chunk):
        split_calls.append(key.shape[2] // chunk)
        return split_keys_sdpa(query, key, value, mask, scale, chunk)

    monkeypatch.setattr(grouped_attention, "split_keys_sdpa", recording)
    monkeypatch.setattr(grouped_attention, "_split_keys", 2)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", grouped_attention.packed_gqa_sdpa)
    ours = cb_model.generate(MESSAGES, max_tokens=24, temperature=0)
    assert split_calls and max(split_calls) > 2  # the prefill's keys went in several chunks
    assert ours["choices"][0]["message"] == reference["choices"][0]["message"]


def test_the_engine_with_packed_grouped_attention_gives_the_same_tokens(cb_model, chat_model, monkeypatch):
    """The tiny model has 4 query heads on 2 key/value heads; routed through the packed path, greedy is unchanged.

    On a CPU the engine leaves it off (SDPA takes grouped heads with a mask there), so the test routes it itself.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from tripod.patches import grouped_attention

    reference = chat_model.generate(MESSAGES, max_tokens=24, temperature=0)
    packed_calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        packed_calls.append(attention_mask is not None and query.shape[2] > 1)
        return grouped_attention.packed_gqa_sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording)
    ours = cb_model.generate(MESSAGES, max_tokens=24, temperature=0)
    assert any(packed_calls)  # the batch's masked steps took the packed path
    assert ours["choices"][0]["message"] == reference["choices"][0]["message"]


def test_packed_grouped_attention_is_on_by_default_and_left_out_on_cpu(cb_model):
    """On by default (it won on an H100), but only CUDA takes it: on CPU SDPA takes grouped heads with a mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from tripod.conf import config

    assert config().cb_packed_gqa is True
    assert cb_model.cb_packed_gqa is True
    assert config().cb_split_keys == cb_model.cb_split_keys == 0  # split keys: opt-in
    assert cb_model.device == "cpu"
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward  # the engine left transformers' own in place


def test_a_missing_transformers_internal_fails_the_load_naming_the_versions(chat_model, monkeypatch):
    """A transformers release that moved an internal hf-cb uses fails at load, by name, not inside a request."""
    import transformers
    from transformers.generation.continuous_batching import cb_logits_processors

    monkeypatch.delattr(cb_logits_processors, "ContinuousBatchingTopPLogitsWarper")  # fault injection: the drift
    model = ChatModel(engine="hf-cb", model_name="tiny", path=chat_model.tokenizer.name_or_path)
    with pytest.raises(EngineFailure) as caught:
        model.load()
    message = caught.value.message
    assert "written against transformers >=5.24,<5.25" in message
    assert f"installed transformers {transformers.__version__}" in message
    assert "cb_logits_processors.ContinuousBatchingTopPLogitsWarper" in message
    assert model.manager is None  # it failed before starting a batching loop


def test_a_manager_without_the_attributes_hf_cb_reads_is_refused(cb_model):
    from tripod.engines.hf_cb_internals import check_manager

    check_manager(cb_model.manager)  # the real one has them all
    router = SimpleNamespace(result_handlers={})  # no _lock
    fake = SimpleNamespace(output_router=router, background_thread_status=None, logit_processor=None)
    with pytest.raises(EngineFailure, match=r"lacks ContinuousBatchingManager\.output_router\._lock"):
        check_manager(fake)


def test_the_pinned_transformers_is_in_the_range_hf_cb_was_written_against():
    """Moving the pin in requirements.txt needs a look at hf_cb_internals (and a new range there)."""
    import re
    from pathlib import Path

    from packaging.version import Version

    from tripod.engines.hf_cb_internals import SUPPORTED_TRANSFORMERS

    requirements = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text()
    pinned = Version(re.search(r"^transformers==(\S+)", requirements, re.M).group(1))
    low, below = (Version(v) for v in SUPPORTED_TRANSFORMERS)
    assert low <= pinned < below
