"""OpenAI response objects: ``chat.completion``, ``chat.completion.chunk``, ``text_completion``.

They are built here alone, so that REST answers, SSE and resumable streams give them the same shape. Plain Python, so
that engines import it without Django.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from tripod.engines.base import Delta, TokenLogprob, ToolCallDelta

# Stands for a delta's text while the JSON around it is rendered (ChunkBuilder.delta_json).
_TEXT_MARK = json.dumps("\x00tripod-delta-text\x00")


def compact_json(payload: Any) -> str:
    """The JSON of a chunk or error as streams carry it: no spaces."""
    return json.dumps(payload, separators=(",", ":"))


def new_id(kind: str) -> str:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def _logprob(value: float) -> float:
    # JSON has no -Infinity; vLLM writes a masked token's logprob the same way.
    return max(value, -9999.0)


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's ``logprobs``: one entry per token, with its ``top_logprobs`` alternatives."""
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": _logprob(lp.logprob),
                "bytes": list(lp.bytes),
                "top_logprobs": [
                    {"token": token, "logprob": _logprob(value), "bytes": list(raw)} for token, raw, value in lp.top
                ],
            }
            for lp in logprobs
        ],
        "refusal": None,
    }


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """A text completion choice's legacy ``logprobs``; ``offset`` is where the first token's text starts."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [_logprob(lp.logprob) for lp in logprobs],
        "top_logprobs": [{token: _logprob(value) for token, _, value in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def tool_call_chunks(calls: Sequence[ToolCallDelta]) -> list[dict[str, Any]]:
    """Streamed ``delta.tool_calls``: a call's first piece has its id, type and name, the later ones arguments."""
    chunks = []
    for call in calls:
        function: dict[str, Any] = {"arguments": call.arguments}
        chunk: dict[str, Any] = {"index": call.index}
        if call.id is not None or call.name is not None:
            chunk.update(id=call.id, type="function")
            function = {"name": call.name, "arguments": call.arguments}
        chunk["function"] = function
        chunks.append(chunk)
    return chunks


class ChoiceText:
    """One choice of a reply, gathered from its deltas: text, tool calls and log-probabilities."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.logprobs: list[TokenLogprob] = []

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        for call in delta.tool_calls:
            entry = self.calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] = call.name or entry["name"]
            entry["arguments"] += call.arguments

    def tool_calls(self) -> list[dict[str, Any]]:
        return [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
            for _, call in sorted(self.calls.items())
        ]


class ReplyText:
    """A whole reply gathered from its deltas, every choice by its index, for the non-streamed answer."""

    def __init__(self, choices: int = 1, logprobs: bool = False) -> None:
        self.choices = [ChoiceText() for _ in range(choices)]
        self.want_logprobs = logprobs

    def add(self, delta: Delta) -> None:
        self.choices[delta.index].add(delta)

    def completion(
        self,
        kind: str,
        *,
        model: str,
        finish_reasons: Sequence[str | None],
        usage: dict[str, int] | None,
        id: str | None = None,
    ) -> dict[str, Any]:
        """The ``chat.completion`` or ``text_completion`` object."""
        choices = []
        for index, (choice, reason) in enumerate(zip(self.choices, finish_reasons, strict=True)):
            text = "".join(choice.text)
            if kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                calls = choice.tool_calls()
                if calls:
                    message = {"role": "assistant", "content": text or None, "tool_calls": calls}
                logprobs = chat_logprobs(choice.logprobs) if self.want_logprobs else None
                choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason})
            else:
                logprobs = completion_logprobs(choice.logprobs) if self.want_logprobs else None
                choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
        return {
            "id": id or new_id(kind),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage,
        }


class ChunkBuilder:
    """Frames one stream's chunks; each choice's first chat delta carries the role, as OpenAI's do."""

    def __init__(self, kind: str, model: str, include_usage: bool, logprobs: bool = False) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.id = new_id(kind)
        self.created = int(time.time())
        self._sent_role: set[int] = set()
        self._offsets: dict[int, int] = {}  # text completions' text_offset, per choice
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

    def delta(
        self,
        text: str,
        index: int = 0,
        tool_calls: Sequence[ToolCallDelta] = (),
        logprobs: Sequence[TokenLogprob] = (),
    ) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": text}
            if index not in self._sent_role:
                delta = {"role": "assistant", "content": text}
                self._sent_role.add(index)
            if tool_calls:
                delta["tool_calls"] = tool_call_chunks(tool_calls)
                if not text:
                    delta.pop("content")
            rendered = chat_logprobs(logprobs) if self.logprobs and logprobs else None
            return self._chunk({"index": index, "delta": delta, "logprobs": rendered, "finish_reason": None})
        rendered = None
        if self.logprobs and logprobs:
            rendered = completion_logprobs(logprobs, self._offsets.get(index, 0))
        self._offsets[index] = self._offsets.get(index, 0) + len(text)
        return self._chunk({"index": index, "text": text, "logprobs": rendered, "finish_reason": None})

    def opening(self, choices: int) -> list[dict[str, Any]]:
        """The chunks a stream of several chat choices starts with: each choice's role, in index order (as vLLM
        sends them), so that a client's accumulator meets choice 0 first whichever choice speaks first (the openai
        SDK's stream helper fails otherwise). One choice needs none: its first delta carries the role."""
        if self.kind != "chat" or choices < 2:
            return []
        return [self.delta("", index) for index in range(choices)]

    def render(self, delta: Delta) -> str:
        """The JSON of the chunk for an engine delta: the fast path for plain text of the first choice."""
        if delta.index == 0 and not delta.tool_calls and not self.logprobs:
            return self.delta_json(delta.text)
        return compact_json(self.delta(delta.text, delta.index, delta.tool_calls, delta.logprobs))

    def delta_json(self, text: str) -> str:
        """``compact_json(self.delta(text))``, without building and encoding the whole chunk for every token.

        After the first chunk (which carries the role) only the text changes, so the JSON around it is rendered
        once, with a marker where the text goes, and each delta encodes just its text.
        """
        if self._around is None:
            if self._around_failed or (self.kind == "chat" and 0 not in self._sent_role):
                return self._slow_delta_json(text)
            rendered = compact_json(self._plain_chunk(json.loads(_TEXT_MARK)))
            if rendered.count(_TEXT_MARK) != 1:  # the marker also in the model name: render every chunk
                self._around_failed = True
                return self._slow_delta_json(text)
            head, _, tail = rendered.partition(_TEXT_MARK)
            self._around = (head, tail)
        head, tail = self._around
        return head + json.dumps(text) + tail

    def _slow_delta_json(self, text: str) -> str:
        if self.kind == "chat":
            return compact_json(self.delta(text))
        return compact_json(self._plain_chunk(text))

    def _plain_chunk(self, text: str) -> dict[str, Any]:
        """A first-choice delta chunk of plain text, the role already sent; leaves the builder's state alone."""
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return self._chunk(choice)

    def finish(self, finish_reason: str | None, index: int = 0) -> dict[str, Any]:
        if self.kind == "chat":
            delta = {} if index in self._sent_role else {"role": "assistant", "content": ""}
            self._sent_role.add(index)
            return self._chunk({"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason})
        return self._chunk({"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason})

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._chunk(None, usage)
