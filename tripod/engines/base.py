"""The engine contract every backend implements (the seed's ``ChatModel``).

An engine turns a prompt into a stream of text deltas. Stop sequences, finish reasons and the
OpenAI response shape are handled here once, so that engines only produce tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tripod.engines.text import StopMatcher
from tripod.errors import EngineFailure, InvalidRequest
from tripod.protocol import SEED_MODULUS, SamplingParams

if TYPE_CHECKING:
    from tripod.engines.reply import Reply
    from tripod.engines.tool_calls import ToolCallFormat

Prompt = list[dict[str, Any]] | str

# Engine name -> module that defines it; imported on first use so that heavy imports stay lazy.
ENGINE_MODULES = {"hf": "tripod.engines.hf", "hf-cb": "tripod.engines.hf_cb", "openai": "tripod.engines.openai_relay"}


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the ``top`` alternatives, each (token text, UTF-8 bytes, logprob)."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[tuple[str, tuple[int, ...], float], ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call: ``id`` and ``name`` come once, first; ``arguments`` then grow by pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    """A piece of generated text and how many tokens produced it, with what the request asked for beside it."""

    text: str
    tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token behind this delta, when the request asked for them
    tool_calls: tuple[ToolCallDelta, ...] = ()  # parsed out of the text: that part is not in ``text``
    index: int = 0  # the choice (n > 1) it belongs to


@dataclass
class GenerationRecord:
    """What one finished generation did; kept so that tests and operators can watch the engine."""

    id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    cancelled: bool
    steps_after_cancel: int
    finished_at: float = field(default_factory=time.monotonic)


# What an engine hands to a push sink: a delta, END when the generation is over, or the exception that ended it.
END = None
PushItem = Delta | BaseException | None


class RawGeneration:
    """An engine's token stream for one request, before the text layer (stop sequences) sees it.

    Engines subclass it: iterate to get :class:`Delta` objects, ``cancel()`` from any thread stops the
    work within one decode step, ``eos`` says whether the model ended the text itself.

    An asyncio reader uses ``push_to`` instead of iterating. The default runs the iterator on a thread of
    its own; an engine whose tokens come from a thread it already runs (a batching loop) overrides it to
    deliver each step's output for all its requests with one wake-up of the event loop.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    eos: bool = False
    finish_reasons: dict[int, str] | None = None  # per choice, from an engine that ``emits_choices``
    steps_after_cancel: int = 0
    # Longest wait for the next push before the reader gives up (None: the engine times out by itself).
    push_timeout: float | None = None

    def __init__(self) -> None:
        self.cancel_event = threading.Event()

    def __iter__(self) -> Iterator[Delta]:
        raise NotImplementedError

    def push_to(self, loop: asyncio.AbstractEventLoop, sink: Callable[[PushItem], None]) -> None:
        """From now on, call ``sink`` on ``loop`` with each delta, then with END or the exception that ended it.

        Called on ``loop``'s thread. This default iterates on a daemon thread (one per generation).
        """

        def deliver(item: PushItem) -> None:
            try:
                loop.call_soon_threadsafe(sink, item)
            except RuntimeError:  # the loop is closed: nobody reads any more
                self.cancel()

        def produce() -> None:
            try:
                for delta in self:
                    deliver(delta)
                deliver(END)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader on the loop
                deliver(exc)

        threading.Thread(target=produce, name="tripod-stream", daemon=True).start()

    def cancel(self) -> None:
        self.cancel_event.set()

    def close(self) -> None:
        """Release the engine's resources for this request (wait for its thread, free its slot)."""

    async def aclose(self) -> None:
        """``close()`` from the event loop: off the loop, since it may wait for the engine's thread."""
        await asyncio.to_thread(self.close)


def merge_deltas(parts: list[Delta]) -> Delta:
    """Consecutive deltas of one choice as one: text joined, tokens summed, a tool call's argument pieces joined."""
    if len(parts) == 1:
        return parts[0]
    calls: list[ToolCallDelta] = []
    for part in parts:
        for call in part.tool_calls:
            last = calls[-1] if calls else None
            if last is not None and last.index == call.index and call.id is None and call.name is None:
                calls[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + call.arguments)
            else:
                calls.append(call)
    return Delta(
        "".join(part.text for part in parts),
        sum(part.tokens for part in parts),
        tuple(lp for part in parts for lp in part.logprobs),
        tuple(calls),
        parts[0].index,
    )


class _Inbox:
    """Pushed items for one asyncio reader: ``put`` on the loop, ``take`` everything pending at once.

    ``take`` waits until the pending deltas hold ``min_tokens`` tokens, or the generation has ended, or a delta
    arrives ``hold`` seconds or more after the last ``take``: a reader that merges tokens is woken once per merged
    delta, not once per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[PushItem] = []
        self.min_tokens: float = 1
        self.hold = 0.0
        self.taken_at = 0.0
        self._tokens = 0
        self._ended = False
        self._waiter: asyncio.Future | None = None

    def put(self, item: PushItem) -> None:
        self.items.append(item)
        if isinstance(item, Delta):
            self._tokens += item.tokens
        else:
            self._ended = True
        if self._waiter is not None and not self._waiter.done() and self._ready():
            self._waiter.set_result(True)

    def _ready(self) -> bool:
        if not self.items:
            return False
        return self._ended or self._tokens >= self.min_tokens or self.loop.time() - self.taken_at >= self.hold

    async def take(self, timeout: float | None) -> list[PushItem]:
        if not self._ready():
            self._waiter = self.loop.create_future()
            timer = None if timeout is None else self.loop.call_later(timeout, self._expire, self._waiter)
            try:
                if not await self._waiter:
                    raise EngineFailure(f"The engine produced nothing for {timeout:g} s.", code="engine_timeout")
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        items, self.items, self._tokens = self.items, [], 0
        self.taken_at = self.loop.time()
        return items

    @staticmethod
    def _expire(waiter: asyncio.Future) -> None:
        if not waiter.done():
            waiter.set_result(False)


class TokenStream:
    """One generation as the server sees it: deltas with stop sequences applied, then a finish reason."""

    def __init__(
        self, raw: RawGeneration, params: SamplingParams, max_tokens: int, on_finish=None, apply_stops: bool = True
    ) -> None:
        self.id = uuid.uuid4().hex
        self.raw = raw
        self.params = params
        self.max_tokens = max_tokens
        self.finish_reason: str | None = None
        # An engine that emits every choice (a relay) applies stops upstream, per choice.
        self._stops = StopMatcher(params.stop if apply_stops else ())
        self._on_finish = on_finish
        self._finished = False
        self._pending_tokens = 0  # tokens behind text the stop matcher still holds back
        self._pending_logprobs: list[TokenLogprob] = []  # and their log-probabilities

    @property
    def prompt_tokens(self) -> int:
        return self.raw.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.raw.completion_tokens

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def cancel(self) -> None:
        """Stop generating; safe from any thread."""
        self.raw.cancel()

    def close(self) -> None:
        """Stop and release a stream that will not be read (a request whose other choices failed to start)."""
        self.raw.cancel()
        self._finish()

    def __iter__(self) -> Iterator[Delta]:
        try:
            for delta in self.raw:
                accepted = self._accept(delta)
                if accepted is not None:
                    yield accepted
                if self._stops.stopped:
                    return
            tail = self._end()
            if tail is not None:
                yield tail
        finally:
            self._finish()

    async def deltas_async(self, interval: int | Callable[[], int] = 1, hold: float = 0.0) -> AsyncIterator[Delta]:
        """The same deltas on the running event loop, each one everything that arrived since the last.

        A reader that falls behind gets fewer, larger deltas instead of a backlog. After the first delta, each
        waits for ``interval`` tokens (0: for the end; a callable is asked after each delta), unless a token
        arrives ``hold`` seconds or more after the previous delta (so a slow engine's tokens still come as they
        are made). Use it with ``contextlib.aclosing`` so that leaving early cancels the generation and frees its
        slot.
        """
        loop = asyncio.get_running_loop()
        inbox = _Inbox(loop)
        inbox.hold = hold if interval != 1 else 0.0  # one token per delta: nothing to wait for
        next_interval = interval if callable(interval) else lambda: interval
        self.raw.push_to(loop, inbox.put)
        ended = False
        try:
            while not ended:
                merged: dict[int, list[Delta]] = {}  # by choice: only a relay's stream holds several
                for item in await inbox.take(self.raw.push_timeout):
                    if isinstance(item, BaseException):
                        raise item
                    accepted = self._end() if item is END else self._accept(item)
                    ended = item is END or self._stops.stopped
                    if accepted is not None:
                        merged.setdefault(accepted.index, []).append(accepted)
                    if ended:
                        break
                for parts in merged.values():
                    yield merge_deltas(parts)
                if merged:
                    inbox.min_tokens = next_interval() or math.inf
        finally:
            if not ended:
                self.raw.cancel()
            if not self._finished:
                self._finished = True
                await self.raw.aclose()
                self._report()

    def _accept(self, delta: Delta) -> Delta | None:
        """One raw delta through the stop sequences: what is safe to emit, with the tokens behind it."""
        text = self._stops.feed(delta.text)
        self._pending_tokens += delta.tokens
        if delta.logprobs:
            self._pending_logprobs.extend(delta.logprobs)
        if self._stops.stopped:
            self.raw.cancel()
            self.finish_reason = "stop"
        if not (text or delta.tool_calls or delta.logprobs):  # logprobs go out with their tokens, text or not
            return None
        logprobs = ()
        if self._pending_logprobs:
            logprobs, self._pending_logprobs = tuple(self._pending_logprobs), []
        accepted = Delta(text, self._pending_tokens, logprobs, delta.tool_calls, delta.index)
        self._pending_tokens = 0
        return accepted

    def _end(self) -> Delta | None:
        """The engine ended the generation: release held-back text and name the finish reason."""
        if self.raw.cancel_event.is_set():
            self.finish_reason = None
        elif self.raw.eos:
            self.finish_reason = "stop"
        else:
            self.finish_reason = "length"
        tail = self._stops.flush()
        tokens, self._pending_tokens = self._pending_tokens, 0
        logprobs, self._pending_logprobs = tuple(self._pending_logprobs), []
        return Delta(tail, tokens, logprobs) if tail or tokens else None

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.raw.close()
        self._report()

    def _report(self) -> None:
        if self._on_finish is not None:
            self._on_finish(self)


class ChatModel:
    """A language model behind one engine.

    ``ChatModel(engine="hf", model_name="tiny")`` builds the engine's subclass; use
    :func:`tripod.engines.get_chat_model` for the shared, lazily loaded instance.
    """

    engine: ClassVar[str] = ""
    default_slots: ClassVar[int] = 1
    # How tool calls look in this model's text (engines/tool_calls.py); None: its template renders no tools.
    tool_format: ToolCallFormat | None = None
    # A relay's upstream makes every choice (n) and parses tool calls itself: its deltas carry their ``index`` and
    # ``tool_calls``, and its generation's ``finish_reasons`` names each choice's end. Other engines make one
    # choice per generation and the server parses their text.
    emits_choices: ClassVar[bool] = False
    registry: ClassVar[dict[str, type[ChatModel]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.engine:
            ChatModel.registry[cls.engine] = cls

    def __new__(cls, engine: str | None = None, model_name: str | None = None, **kwargs: Any):
        if cls is ChatModel:
            from tripod.engines import engine_class

            cls = engine_class(engine)
        return super().__new__(cls)

    def __init__(self, engine: str | None = None, model_name: str | None = None, **options: Any) -> None:
        self.model_name = model_name
        self.options = options
        self.context_length = 0
        self.history: deque[GenerationRecord] = deque(maxlen=256)
        self._active: dict[str, TokenStream] = {}
        self._lock = threading.Lock()

    @property
    def can_generate(self) -> bool:
        """Whether the engine is loaded and able to take requests."""
        return False

    @property
    def active_generations(self) -> int:
        return len(self._active)

    def load(self) -> None:
        """Load weights; called once by the factory, off the event loop."""

    def start(
        self,
        prompt: Prompt,
        params: SamplingParams,
        max_prompt_tokens: int | None = None,
        max_tokens_cap: int | None = None,
    ) -> TokenStream:
        """Tokenize ``prompt``, check it against the context and the server's limits, return a stream.

        ``max_tokens_cap`` bounds a request that gave no ``max_tokens`` (never turning it into an error).
        """
        raw, max_tokens = self._start_raw(prompt, params, max_prompt_tokens, max_tokens_cap)
        stream = TokenStream(raw, params, max_tokens, on_finish=self._record)
        with self._lock:
            self._active[stream.id] = stream
        return stream

    def _start_raw(
        self,
        prompt: Prompt,
        params: SamplingParams,
        max_prompt_tokens: int | None = None,
        max_tokens_cap: int | None = None,
    ) -> tuple[RawGeneration, int]:
        raise NotImplementedError

    def _record(self, stream: TokenStream) -> None:
        with self._lock:
            self._active.pop(stream.id, None)
        self.history.append(
            GenerationRecord(
                id=stream.id,
                prompt_tokens=stream.prompt_tokens,
                completion_tokens=stream.completion_tokens,
                finish_reason=stream.finish_reason,
                cancelled=stream.raw.cancel_event.is_set() and stream.finish_reason is None,
                steps_after_cancel=stream.raw.steps_after_cancel,
            )
        )

    def start_reply(
        self,
        prompt: Prompt,
        params: SamplingParams,
        max_prompt_tokens: int | None = None,
        max_tokens_cap: int | None = None,
    ) -> Reply:
        """Start every choice of a request (``params.n``), each with its tool-call parser; see ``engines/reply.py``."""
        from tripod.engines.reply import Reply
        from tripod.engines.tool_calls import ToolCallParser

        limits = {"max_prompt_tokens": max_prompt_tokens, "max_tokens_cap": max_tokens_cap}
        if self.emits_choices:
            return Reply([self.start(prompt, params, **limits)], [None], relayed_choices=params.n)
        if params.tools is not None and self.tool_format is None:
            raise InvalidRequest(
                f"The model '{self.model_name}' has no tool-call format: its chat template renders no tools. Set "
                "TRIPOD_TOOL_PARSER (hermes, llama3 or mistral) if it was trained for one.",
                param="tools",
                code="tools_unsupported",
            )
        streams: list[TokenStream] = []
        try:
            for i in range(params.n):
                streams.append(self.start(prompt, choice_params(params, i), **limits))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        tools = params.tools
        parsers = [None if tools is None else ToolCallParser(self.tool_format, tools) for _ in streams]
        return Reply(streams, parsers)

    def generate(self, messages_or_prompt: Prompt, **params: Any) -> dict[str, Any]:
        """Run one request to the end and return an OpenAI ``chat.completion`` dict."""
        from tripod.responses import ReplyText

        sampling = params.pop("sampling", None) or SamplingParams(**params)
        reply = self.start_reply(messages_or_prompt, sampling)
        text = ReplyText(reply.choices, sampling.logprobs)
        for delta in reply:
            text.add(delta)
        return text.completion(
            "chat", model=self.model_name or "", finish_reasons=reply.finish_reasons, usage=reply.usage()
        )

    def stream(self, messages_or_prompt: Prompt, **params: Any) -> TokenStream:
        """The streaming method of the contract: iterate for deltas, ``cancel()`` to stop."""
        sampling = params.pop("sampling", None) or SamplingParams(**params)
        return self.start(messages_or_prompt, sampling)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s own sampling: one choice, seeded ``seed + index`` when the request gave a seed."""
    seed = None if params.seed is None else (params.seed + index) % SEED_MODULUS
    return dataclasses.replace(params, n=1, seed=seed)
