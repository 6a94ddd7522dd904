"""The same load on the engine in this process, no server: what the server's overhead is measured against.

N threads call ``model.stream(...)`` and time its deltas as a client times frames. At most ``slots``
generations run at once, as in the server's worker, so that TTFT includes the same wait for a slot.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tripod.bench.metrics import RequestResult
from tripod.bench.transports import describe
from tripod.protocol import SamplingParams

if TYPE_CHECKING:
    from tripod.engines import ChatModel


def load_engine(model: str | None, engine: str) -> ChatModel:
    """The shared ``ChatModel`` for ``model`` (default: ``TRIPOD_MODEL``), loaded; sets up Django first."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tripod.settings")
    import django
    from django.apps import apps

    if not apps.ready:  # a host process (a test, a shell) may have set Django up already
        django.setup()
    from tripod.engines import get_chat_model

    return get_chat_model(model or None, engine)


def engine_slots(chat_model: ChatModel) -> int:
    """The slots the server's worker would give this engine: ``TRIPOD_SLOTS`` or the engine's default."""
    from tripod.conf import config

    return config().slots or chat_model.default_slots


class FairSlots:
    """A counting semaphore that admits waiters in arrival order.

    ``threading.Semaphore`` is not fair: a thread that releases a slot often takes it straight back, so
    with more clients than slots some requests starve while others run twice. The server's job queue is
    first in, first out, and so is this.
    """

    def __init__(self, slots: int) -> None:
        self._condition = threading.Condition()
        self._free = slots
        self._next_ticket = 0
        self._admitted = 0

    def __enter__(self) -> None:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: ticket == self._admitted and self._free > 0)
            self._admitted += 1
            self._free -= 1
            # The next ticket may find a slot free too.
            self._condition.notify_all()

    def __exit__(self, *exc_info: object) -> None:
        with self._condition:
            self._free += 1
            self._condition.notify_all()


def time_generation(chat_model: ChatModel, prompt: str, params: SamplingParams) -> tuple[RequestResult, str]:
    """Time one generation of ``prompt`` under ``params`` as a client times frames, and keep its text."""
    result, pieces = RequestResult(), []
    started = time.perf_counter()
    last = None
    try:
        stream = chat_model.start([{"role": "user", "content": prompt}], params)
        for delta in stream:
            if not delta.text:
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - started
            else:
                result.itl.append(now - last)
            last = now
            pieces.append(delta.text)
            result.content_pieces += 1
        result.prompt_tokens = stream.prompt_tokens
        result.output_tokens = stream.completion_tokens
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - every failure is a counted result, never a crash
        result.error = describe(exc)
    result.e2el = time.perf_counter() - started
    return result, "".join(pieces)


def run_one(
    chat_model: ChatModel, prompt: str, output_len: int, ignore_eos: bool, temperature: float, seed: int | None
) -> RequestResult:
    """Time one generation; the caller holds a slot for it."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=ignore_eos, temperature=temperature, seed=seed)
    return time_generation(chat_model, prompt, params)[0]


def run_threads(
    chat_model: ChatModel,
    prompts: list[str],
    concurrency: int,
    slots: int,
    output_len: int,
    ignore_eos: bool,
    temperature: float,
    seed: int | None,
    on_result: Callable[[RequestResult], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """``concurrency`` threads send every prompt once; ``slots`` bounds the generations running at once."""

    def request(index: int) -> RequestResult:
        # The clock starts before the wait for a slot, as a server request's clock starts before its queue.
        started = time.perf_counter()
        with gate:
            result = run_one(
                chat_model,
                prompts[index],
                output_len,
                ignore_eos,
                temperature,
                None if seed is None or temperature == 0 else seed + index,
            )
        waited = time.perf_counter() - started - result.e2el
        result.e2el += waited
        if result.ttft is not None:
            result.ttft += waited
        return result

    gate = FairSlots(slots if slots > 0 else max(len(prompts), 1))
    results: list[RequestResult | None] = [None] * len(prompts)
    next_index = iter(range(len(prompts)))
    index_lock = threading.Lock()

    def worker() -> None:
        while True:
            with index_lock:
                index = next(next_index, None)
            if index is None:
                return
            results[index] = result = request(index)
            if on_result is not None:
                on_result(result)

    threads = [threading.Thread(target=worker, name=f"bench-client-{n}") for n in range(min(concurrency, len(prompts)))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    duration = time.perf_counter() - started
    return [result for result in results if result is not None], duration
