"""OpenAI response objects: ``chat.completion``, ``chat.completion.chunk``, ``text_completion``.

They are built here alone, so that REST answers, SSE and resumable streams give them the same shape. Plain Python, so
that engines import it without Django.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

# Stands for a delta's text while the JSON around it is rendered (ChunkBuilder.delta_json).
_TEXT_MARK = json.dumps("\x00tripod-delta-text\x00")


def compact_json(payload: Any) -> str:
    """The JSON of a chunk or error as streams carry it: no spaces."""
    return json.dumps(payload, separators=(",", ":"))


def new_id(kind: str) -> str:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_completion(
    *, model: str, text: str, finish_reason: str | None, usage: dict[str, int], id: str | None = None
) -> dict[str, Any]:
    return {
        "id": id or new_id("chat"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
    }


def text_completion(
    *, model: str, text: str, finish_reason: str | None, usage: dict[str, int], id: str | None = None
) -> dict[str, Any]:
    return {
        "id": id or new_id("completion"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
    }


def completion(kind: str, **fields: Any) -> dict[str, Any]:
    """The non-streamed response for a request of ``kind`` ("chat" or "completion")."""
    return chat_completion(**fields) if kind == "chat" else text_completion(**fields)


class ChunkBuilder:
    """Frames one stream's chunks; the first chat delta carries the role, as OpenAI's do."""

    def __init__(self, kind: str, model: str, include_usage: bool) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = new_id(kind)
        self.created = int(time.time())
        self._sent_role = False
        # The delta chunk's JSON before and after its text, once a chunk without the role has been rendered.
        self._around: tuple[str, str] | None = None
        self._around_failed = False

    def _chunk(self, choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice is not None else [],
        }
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    def delta(self, text: str) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": text}
            if not self._sent_role:
                delta = {"role": "assistant", "content": text}
                self._sent_role = True
            return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": None})

    def delta_json(self, text: str) -> str:
        """``compact_json(self.delta(text))``, without building and encoding the whole chunk for every token.

        After the first chunk (which carries the role) only the text changes, so the JSON around it is rendered
        once, with a marker where the text goes, and each delta encodes just its text.
        """
        if self._around is None:
            if self._around_failed or (self.kind == "chat" and not self._sent_role):
                return compact_json(self.delta(text))
            rendered = compact_json(self.delta(json.loads(_TEXT_MARK)))
            if rendered.count(_TEXT_MARK) != 1:  # the marker also in the model name: render every chunk
                self._around_failed = True
                return compact_json(self.delta(text))
            head, _, tail = rendered.partition(_TEXT_MARK)
            self._around = (head, tail)
        head, tail = self._around
        return head + json.dumps(text) + tail

    def finish(self, finish_reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            delta = {} if self._sent_role else {"role": "assistant", "content": ""}
            self._sent_role = True
            return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason})
        return self._chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason})

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._chunk(None, usage)
