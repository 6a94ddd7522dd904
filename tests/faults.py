"""Fault injection into the in-process engine: forward passes that take longer than they should."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def slow_forwards(chat_model, seconds: float, *, first_only: bool = False) -> Iterator[None]:
    """Every forward pass (one per token), or only the next one (a request's prefill), takes ``seconds`` more."""
    calls = {"n": 0}

    def hook(module, args) -> None:
        calls["n"] += 1
        if not first_only or calls["n"] == 1:
            threading.Event().wait(seconds)

    handle = chat_model.model.model.layers[0].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        # A test may end while a slowed pass still holds its generation: leave the engine idle for the next one.
        deadline = time.monotonic() + seconds + 10
        while chat_model.active_generations and time.monotonic() < deadline:
            time.sleep(0.05)
