"""Dataset files for supervised fine-tuning, read into OpenAI-style conversations.

Three record formats, one JSON object per line (``.jsonl``) or a JSON array (``.json``):

- ``messages``: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``
- ``alpaca``: ``{"instruction": "...", "input": "...", "output": "...", "system": "...", "history": [[q, a], ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}``

Every problem names the file and the line (or, in a JSON array, the record number).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tripod.training.errors import DatasetError

Message = dict[str, str]
Conversation = list[Message]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# At most this many record problems are listed; the rest are counted.
MAX_REPORTED = 10


def read_records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs: ``where`` is ``file:line`` for JSON lines, ``file: record N`` for a JSON array."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: a .json dataset must hold a list of records, got {type(data).__name__}")
        return [(f"{path}: record {number}", record) for number, record in enumerate(data, 1)]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    return records


def detect_format(record: Any) -> str | None:
    """The format a record's keys say it is in, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def from_messages(record: dict[str, Any]) -> Conversation:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    conversation = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
        conversation.append({"role": role, "content": _string(message.get("content"), f"messages[{index}].content")})
    return conversation


def from_alpaca(record: dict[str, Any]) -> Conversation:
    conversation: Conversation = []
    if record.get("system"):
        conversation.append({"role": "system", "content": _string(record["system"], "'system'")})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise ValueError("'history' must be a list of [question, answer] pairs")
    for index, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"history[{index}] must be a [question, answer] pair")
        conversation.append({"role": "user", "content": _string(pair[0], f"history[{index}][0]")})
        conversation.append({"role": "assistant", "content": _string(pair[1], f"history[{index}][1]")})
    prompt = _string(record.get("instruction"), "'instruction'")
    extra = _string(record.get("input") or "", "'input'")
    conversation.append({"role": "user", "content": f"{prompt}\n{extra}" if extra else prompt})
    conversation.append({"role": "assistant", "content": _string(record.get("output"), "'output'")})
    return conversation


def from_sharegpt(record: dict[str, Any]) -> Conversation:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    conversation: Conversation = []
    if record.get("system"):
        conversation.append({"role": "system", "content": _string(record["system"], "'system'")})
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{index}] must be an object")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            known = ", ".join(SHAREGPT_ROLES)
            raise ValueError(f"conversations[{index}].from must be one of {known}, got {speaker!r}")
        content = _string(turn.get("value"), f"conversations[{index}].value")
        conversation.append({"role": SHAREGPT_ROLES[speaker], "content": content})
    return conversation


CONVERTERS = {"messages": from_messages, "alpaca": from_alpaca, "sharegpt": from_sharegpt}
FORMAT_KEYS = "'messages' (messages), 'instruction' and 'output' (alpaca), or 'conversations' (sharegpt)"


def _converted(records: list[tuple[str, Any]], fmt: str) -> Iterator[tuple[str, Conversation | str]]:
    convert = CONVERTERS[fmt]
    for where, record in records:
        if not isinstance(record, dict):
            yield where, f"expected a JSON object, got {type(record).__name__}"
            continue
        try:
            conversation = convert(record)
        except ValueError as exc:
            yield where, f"{fmt} record: {exc}"
            continue
        if not any(message["role"] == "assistant" for message in conversation):
            yield where, f"{fmt} record has no assistant turn to learn from"
            continue
        yield where, conversation


def load_conversations(
    path: str | Path, dataset_format: str | None = None, max_samples: int | None = None
) -> tuple[list[Conversation], str]:
    """The dataset's conversations (the first ``max_samples``) and its format, detected when not given."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise DatasetError(f"{path}: the dataset is empty")
    if dataset_format is None:
        where, first = records[0]
        dataset_format = detect_format(first)
        if dataset_format is None:
            keys = ", ".join(sorted(first)) if isinstance(first, dict) else type(first).__name__
            raise DatasetError(
                f"{where}: cannot tell the dataset format from this record ({keys}); expected {FORMAT_KEYS}, "
                "or set dataset_format"
            )
    if max_samples is not None:
        records = records[:max_samples]
    conversations: list[Conversation] = []
    problems: list[str] = []
    for where, result in _converted(records, dataset_format):
        if isinstance(result, str):
            problems.append(f"{where}: {result}")
        else:
            conversations.append(result)
    if problems:
        more = len(problems) - MAX_REPORTED
        listed = problems[:MAX_REPORTED] + ([f"... and {more} more"] if more > 0 else [])
        raise DatasetError(f"{len(problems)} bad record(s) in {path}:\n" + "\n".join(f"  - {p}" for p in listed))
    return conversations, dataset_format
