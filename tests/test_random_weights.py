"""Random-weight models (``random:CONFIG``) for benchmarks: built from a config, no download."""

from __future__ import annotations

import json

from tripod.engines import ChatModel

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


def test_random_model_from_a_config_streams_visible_tokens(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    model = ChatModel(engine="hf", model_name="random", path=f"random:{config}", cache_dir=tmp_path / "cache")
    model.load()
    assert model.model.config.vocab_size == 4096 and len(model.tokenizer) == 4096
    assert model.context_length == 1024
    stream = model.stream([{"role": "user", "content": "hi"}], max_tokens=32, ignore_eos=True, temperature=1.0)
    deltas = list(stream)
    assert stream.completion_tokens == 32
    # Every id, in or beyond the tiny vocabulary, decodes to text, so deltas arrive token by token.
    assert sum(1 for d in deltas if d.text) >= 16
    assert model.tokenizer.decode([4000]) == " t4000"


def test_the_bench_sizes_prompts_with_a_random_models_own_tokenizer(tmp_path, monkeypatch):
    """Against a server of ``random:CONFIG``, prompts are cut to the exact token count, not approximated with words.

    Word prompts for the 1B model were 294 tokens where 128 were asked: the GPU runs through the server did 2.3
    times the prefill of their ``--direct`` runs (docs/BENCHMARKS.md, GPU).
    """
    from tripod.bench.prompts import build_prompts, chat_prompt_tokens, load_tokenizer

    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    monkeypatch.setenv("TRIPOD_CACHE_DIR", str(tmp_path / "cache"))
    tokenizer, name = load_tokenizer(None, f"random:{config}")
    assert len(tokenizer) == 4096 and name == f"random:{config}"
    prompts = build_prompts(3, 128, 0, tokenizer, name)
    assert prompts.exact and prompts.tokenizer == name
    assert [chat_prompt_tokens(tokenizer, p) for p in prompts.prompts] == [128] * 3
    server = ChatModel(engine="hf", model_name="random", path=f"random:{config}", cache_dir=tmp_path / "cache")
    server.load()
    assert [len(server.encode([{"role": "user", "content": p}])) for p in prompts.prompts] == [128] * 3


def test_the_shipped_llama_1b_config_has_the_benchmark_shape():
    from tests.processes import ROOT

    config = json.loads((ROOT / "tripod" / "bench" / "llama-3.2-1b.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (2048, 16, 32)
    assert (config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (8, 8192, 128256)
