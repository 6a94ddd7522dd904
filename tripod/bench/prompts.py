"""Prompts of a chosen length in tokens, different for every request.

With a tokenizer at hand the whole chat prompt (template included) is exactly ``prompt_len`` tokens, as the
server counts it; without one the prompt is made of words and the run reports the token count the server
saw. Every prompt starts with its request index, so that no two share a cached prefix by accident.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WORDS = """
river mountain window garden letter number yellow simple market history machine silver answer
morning winter engine forest bridge castle planet doctor signal travel circle orange useful
question country village father mother summer button ticket island animal pencil little family
kitchen friend system people between thought problem company student teacher evening picture
weather reason middle finger moment object region season stream street surface theory voice
wonder average balance battery camera canvas carbon center chapter charge cotton custom danger
desert detail dinner energy factor figure flower garage guitar harbor hunger jacket jungle ladder
lesson marble meadow method mirror modern motion museum native nature needle office orbit palace
parent pepper pillow plastic pocket poetry powder prison public rabbit random record rocket rubber
saddle salmon school screen second shadow shield silent smooth soccer spirit spring square stable
string summit supply symbol talent temple tennis thread timber tomato tunnel turtle valley
velvet vessel violin volume wallet walnut wealth wisdom wooden worker writer zipper
""".split()

# Typical tokenizers spend about 1.3 tokens per common English word; the template adds a few more.
WORDS_PER_TOKEN = 0.75
FIT_ATTEMPTS = 16


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a run and how their length was made."""

    prompts: list[str]
    tokenizer: str | None
    exact: bool


def default_cache_dir() -> Path:
    """Where the server builds the tiny model (``TRIPOD_CACHE_DIR``), read without Django settings."""
    return Path(os.environ.get("TRIPOD_CACHE_DIR") or Path.home() / ".cache" / "tripod")


def load_tokenizer(name: str | None, model: str | None) -> tuple[Any, str] | None:
    """A tokenizer from ``--tokenizer`` or the model name, local files only; ``None`` when there is none."""
    source = name or model
    if not source:
        return None
    try:
        from transformers import AutoTokenizer

        from tripod.engines.random_weights import is_random, random_model_tokenizer
        from tripod.engines.tiny import TINY_NAME, resolve_model_path

        if is_random(source):  # the server's tokenizer for it is built locally, like the model (no download)
            return random_model_tokenizer(source, default_cache_dir())[0], source
        path = resolve_model_path(source, default_cache_dir()) if source == TINY_NAME else source
        return AutoTokenizer.from_pretrained(path, local_files_only=True), source
    except Exception as exc:  # noqa: BLE001 - any failure means "approximate with words"
        if name:
            logger.warning("could not load tokenizer %r (%s); prompts are approximated with words", name, exc)
        return None


def chat_prompt_tokens(tokenizer: Any, content: str) -> int:
    """Tokens in a one-message chat prompt, counted the way the server's hf engine encodes it."""
    messages = [{"role": "user", "content": content}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return len(tokenizer(content, add_special_tokens=True, verbose=False)["input_ids"])


def word_text(index: int, rng: random.Random, words: int) -> str:
    return f"{index}: " + " ".join(rng.choices(WORDS, k=max(words, 1)))


def fit_prompt(tokenizer: Any, index: int, rng: random.Random, prompt_len: int) -> tuple[str, bool]:
    """Content whose chat prompt is ``prompt_len`` tokens; ``False`` when only the nearest length fits.

    Token counts do not add up across a cut (pieces merge), so cut, re-count and correct a few times.
    """
    words = prompt_len + 8
    ids: list[int] = []
    while len(ids) < prompt_len + 8:
        ids = tokenizer(word_text(index, rng, words), add_special_tokens=False, verbose=False)["input_ids"]
        words *= 2
    overhead = chat_prompt_tokens(tokenizer, "")
    keep = min(max(prompt_len - overhead, 1), len(ids))
    best_content, best_miss = "", None
    for _ in range(FIT_ATTEMPTS):
        content = tokenizer.decode(ids[:keep])
        miss = chat_prompt_tokens(tokenizer, content) - prompt_len
        if best_miss is None or abs(miss) < abs(best_miss):
            best_content, best_miss = content, miss
        if miss == 0:
            return content, True
        next_keep = min(max(keep - miss, 1), len(ids))
        if next_keep == keep:
            break
        keep = next_keep
    return best_content, False


def build_prompts(
    count: int, prompt_len: int, seed: int, tokenizer: Any | None = None, tokenizer_name: str | None = None
) -> PromptSet:
    """``count`` different prompts of ``prompt_len`` tokens (exactly, given a tokenizer)."""
    rng = random.Random(seed)
    if tokenizer is None:
        words = round(prompt_len * WORDS_PER_TOKEN)
        return PromptSet([word_text(index, rng, words) for index in range(count)], None, False)
    fitted = [fit_prompt(tokenizer, index, rng, prompt_len) for index in range(count)]
    return PromptSet([content for content, _ in fitted], tokenizer_name, all(exact for _, exact in fitted))
