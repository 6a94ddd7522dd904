"""A request's whole reply: its ``n`` choices, each a token stream, with tool calls read out of each choice's text.

Choice ``i`` of a seeded request samples with ``seed + i``, so a seed reproduces every choice. Tool calls are parsed
after the stop sequences, per choice (``tool_calls.ToolCallParser``, the same whatever the number of tokens per delta);
a relay whose upstream makes the choices and parses the calls (``ChatModel.emits_choices``) has one stream whose
deltas already say which choice they belong to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from tripod.engines.base import Delta, TokenStream

if TYPE_CHECKING:
    from tripod.engines.tool_calls import ToolCallParser

_CHOICE_ENDED = object()


class Reply:
    """Every choice of one request: ``deltas_async()`` interleaves them, each delta naming its choice (``index``)."""

    def __init__(
        self, streams: list[TokenStream], parsers: list[ToolCallParser | None], relayed_choices: int | None = None
    ) -> None:
        self.streams = streams
        self.parsers = parsers
        # A relay's one stream carries every choice, each delta naming its own (ChatModel.emits_choices).
        self.relayed = relayed_choices is not None
        self.choices = relayed_choices or len(streams)

    @property
    def prompt_tokens(self) -> int:
        return self.streams[0].prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(stream.completion_tokens for stream in self.streams)

    @property
    def max_tokens(self) -> int:
        return self.streams[0].max_tokens

    def usage(self) -> dict[str, int]:
        """OpenAI's usage: the prompt once, the completion tokens of every choice."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    @property
    def finish_reasons(self) -> list[str | None]:
        """Each choice's finish reason (None: cancelled); "tool_calls" for a choice that ended in tool calls."""
        if self.relayed:  # the upstream named each choice's end ("tool_calls" included)
            stream = self.streams[0]
            if stream.finish_reason is None:  # cancelled
                return [None] * self.choices
            reasons = stream.raw.finish_reasons or {}
            return [reasons.get(i, stream.finish_reason) for i in range(self.choices)]
        reasons = []
        for stream, parser in zip(self.streams, self.parsers, strict=True):
            reason = stream.finish_reason
            if reason == "stop" and parser is not None and parser.called:
                reason = "tool_calls"
            reasons.append(reason)
        return reasons

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0]

    def cancel(self) -> None:
        """Stop every choice; safe from any thread."""
        for stream in self.streams:
            stream.cancel()

    def _parsed(self, i: int, delta: Delta) -> Delta | None:
        """Stream ``i``'s delta with its tool calls read out, naming its choice."""
        own = self._own_index(i)
        index = delta.index if own is None else own
        parser = self.parsers[i]
        if parser is None:
            return delta if index == delta.index else _with_index(delta, index)
        text, calls = parser.feed(delta.text)
        if not (text or calls or delta.tokens):
            return None
        return Delta(text, delta.tokens, delta.logprobs, calls, index)

    def _flushed(self, i: int) -> Delta | None:
        """What stream ``i``'s parser still held when the stream ended."""
        parser = self.parsers[i]
        if parser is None:
            return None
        text, calls = parser.flush()
        return Delta(text, 0, (), calls, i) if text or calls else None

    def _own_index(self, index: int) -> int | None:
        """The choice a stream's deltas belong to: its position, or (relay) what each delta says."""
        return None if self.relayed else index

    def __iter__(self) -> Iterator[Delta]:
        """Every choice's deltas, one choice after the other (for callers without an event loop)."""
        for i, stream in enumerate(self.streams):
            for delta in stream:
                parsed = self._parsed(i, delta)
                if parsed is not None:
                    yield parsed
            flushed = self._flushed(i)
            if flushed is not None:
                yield flushed

    def deltas_async(self, interval: int | Callable[[], int] = 1, hold: float = 0.0) -> AsyncIterator[Delta]:
        """The choices' deltas as they come (``TokenStream.deltas_async`` merging for each); leaving early (use
        ``contextlib.aclosing``) cancels every choice.

        One plain choice (the common case) is its stream's own deltas, with no layer between: every streamed token
        passes here, on the event loop the server shares.
        """
        if len(self.streams) == 1:
            if self.parsers[0] is None:
                return self.streams[0].deltas_async(interval, hold)
            return self._choice_deltas(0, interval, hold)
        return self._interleaved(interval, hold)

    async def _interleaved(self, interval: int | Callable[[], int], hold: float) -> AsyncIterator[Delta]:
        """Several choices' deltas, each choice read by a task of its own."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async with aclosing(self._choice_deltas(index, interval, hold)) as deltas:
                    async for delta in deltas:
                        queue.put_nowait(delta)
                queue.put_nowait(_CHOICE_ENDED)
            except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.streams))]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is _CHOICE_ENDED:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice_deltas(self, i: int, interval: int | Callable[[], int], hold: float) -> AsyncIterator[Delta]:
        async with aclosing(self.streams[i].deltas_async(interval, hold)) as deltas:
            async for delta in deltas:
                parsed = self._parsed(i, delta)
                if parsed is not None:
                    yield parsed
        flushed = self._flushed(i)
        if flushed is not None:
            yield flushed


def _with_index(delta: Delta, index: int) -> Delta:
    return Delta(delta.text, delta.tokens, delta.logprobs, delta.tool_calls, index)
