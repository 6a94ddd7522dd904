"""Conversations to training examples with the model's own chat template; loss only on assistant tokens.

The text is rendered and tokenized exactly as the server renders a prompt (``apply_chat_template``, no extra special
tokens), so the trained model sees at serving time the tokens it learned from. The labels keep each assistant turn,
its end-of-turn token included (that is what teaches the model to stop), and mask the rest.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from tripod.training.datasets import Conversation
from tripod.training.errors import TrainingError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_markers(tokenizer) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and bool(GENERATION_TAG.search(template))


def _render(tokenizer, messages: Conversation, *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (for templates without markers)."""
    text = _render(tokenizer, conversation)
    spans = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, conversation[:index], add_generation_prompt=True) if index else ""
        end_text = _render(tokenizer, conversation[: index + 1])
        if not (text.startswith(before) and text.startswith(end_text)):
            raise TrainingError(
                "The model's chat template renders a conversation differently from its beginning, so the assistant "
                "turns cannot be located; use a template with {% generation %} markers."
            )
        spans.append((len(before), len(end_text)))
    return text, spans


def encode_conversation(tokenizer, conversation: Conversation) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask of the assistant tokens, as the chat template renders ``conversation``."""
    # Templates with {% generation %} markers give the assistant mask directly; for the others each assistant turn
    # is located by rendering the conversation up to it (with the generation prompt) and up to its end.
    if has_generation_markers(tokenizer):
        encoded = tokenizer.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if not tokenizer.is_fast:
        raise TrainingError("The model's tokenizer is not a fast tokenizer, which locating assistant turns needs.")
    text, spans = assistant_spans(tokenizer, conversation)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(start <= begin and end <= stop for start, stop in spans) and end > begin)
        for begin, end in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), mask


@dataclass(frozen=True)
class Examples:
    """Tokenized training examples and what was dropped to make them."""

    rows: list[dict[str, list[int]]]
    truncated: int
    dropped: int
    longest: int


def build_examples(tokenizer, conversations: list[Conversation], cutoff_len: int) -> Examples:
    """``input_ids``/``labels`` rows, cut at ``cutoff_len``; rows left with no assistant token are dropped."""
    if not tokenizer.chat_template:
        raise TrainingError(
            "The model has no chat template, so conversations cannot be formatted; use an instruct/chat model or "
            "add a chat_template to its tokenizer_config.json."
        )
    rows, truncated, dropped, longest = [], 0, 0, 0
    for conversation in conversations:
        ids, mask = encode_conversation(tokenizer, conversation)
        longest = max(longest, len(ids))
        if len(ids) > cutoff_len:
            truncated += 1
            ids, mask = ids[:cutoff_len], mask[:cutoff_len]
        if not any(mask):
            dropped += 1
            continue
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)]
        rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise TrainingError(
            f"No example has an assistant token within cutoff_len={cutoff_len} (longest: {longest} tokens); "
            "raise cutoff_len."
        )
    return Examples(rows, truncated, dropped, longest)


class PaddingCollator:
    """Pads a batch on the right: ``pad_id`` for inputs, -100 for labels, 0 in the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows], dtype=torch.long)

        mask = [[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"])) for row in rows]
        return {
            "input_ids": padded("input_ids", self.pad_id),
            "labels": padded("labels", IGNORE_INDEX),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
