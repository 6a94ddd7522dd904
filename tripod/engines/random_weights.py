"""Random-weight models for benchmarks: ``TRIPOD_MODEL=random:path/to/config.json``.

Like vLLM's dummy load format, the model is built from its config with random weights, so a GPU
benchmark needs no download: decoding speed does not depend on the values of the weights. The tokenizer
is the built-in tiny one, padded with filler tokens (`` t123``) up to the config's vocabulary, so
that every generated id decodes to visible text and streams like a real token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AddedToken, AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tripod.engines.tiny import build_once, ensure_tiny_model

PREFIX = "random:"
SEED = 0


def is_random(model: str) -> bool:
    return model.startswith(PREFIX)


def padded_tokenizer_dir(vocab_size: int, cache_dir: Path) -> Path:
    """The tiny tokenizer padded to ``vocab_size`` ids, built once per size."""

    def build(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(cache_dir))
        if vocab_size < len(tokenizer):
            raise ValueError(f"random models need a vocabulary of at least {len(tokenizer)} ids")
        # Word-like fillers (" t123") so that streamers release each one at once, as they do real words.
        tokenizer.add_tokens([AddedToken(f" t{i}", normalized=False) for i in range(len(tokenizer), vocab_size)])
        tokenizer.save_pretrained(out)

    return build_once(cache_dir, f"random-tokenizer-v2-{vocab_size}", "tokenizer_config.json", build)


def random_model_tokenizer(spec: str, cache_dir: Path):
    """The tokenizer of ``random:CONFIG`` (the one the server encodes prompts with, and the bench sizes them with),
    and the model's config."""
    config = AutoConfig.from_pretrained(spec[len(PREFIX) :])
    return AutoTokenizer.from_pretrained(padded_tokenizer_dir(config.vocab_size, cache_dir)), config


def load_random_model(spec: str, cache_dir: Path, device: str, dtype: torch.dtype):
    """Tokenizer and randomly initialised model for ``random:CONFIG``; weights are created on ``device``."""
    tokenizer, config = random_model_tokenizer(spec, cache_dir)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return tokenizer, model
