"""Each HTTP request's synchronous Django code runs on a thread reused from earlier requests.

asgiref starts new threads for every request, and ``Thread.start`` blocks the event loop until the new thread gets
the GIL. A pool of warm executors avoids that, and lets Django's persistent database connections work as under WSGI
(docs/architecture.md, "Why each patch").
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext

from tripod.observability.logs import REQUEST_ID

# The requirements this patch was written against; tests/test_patch_pins.py holds requirements.txt to them.
WRITTEN_AGAINST = {"asgiref": "==3.13.0"}


class ReusedRequestThreads:
    """ASGI middleware: lends each HTTP request a warm single-thread executor for its thread-sensitive calls."""

    def __init__(self, app, keep_idle: int = 64) -> None:
        self.app = app
        self.keep_idle = keep_idle
        self._idle: list[ThreadPoolExecutor] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        executor = self._idle.pop() if self._idle else ThreadPoolExecutor(1, thread_name_prefix="tripod-request")
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.app(scope, receive, send)
        finally:
            if len(self._idle) < self.keep_idle:
                self._idle.append(executor)
            else:
                executor.shutdown(wait=False)


# Tasks started by a request that run on after it, kept referenced until they finish.
_outliving: set[asyncio.Task] = set()


def outlive_request(coro: Coroutine[Any, Any, Any], request_id: str | None, name: str | None = None) -> asyncio.Task:
    """Run ``coro`` beyond the request that starts it (a background drain, a resumable stream's producer, the
    inline worker, the web heartbeat).

    It gets a context of its own that carries only the request id for its logs (none for a task that serves
    every request): the request's thread goes back to the pool when the request ends, and asgiref refuses
    calls into a context that has exited.
    """
    context = contextvars.Context()
    context.run(REQUEST_ID.set, request_id)
    task = asyncio.get_running_loop().create_task(coro, name=name, context=context)
    _outliving.add(task)
    task.add_done_callback(_outliving.discard)
    return task
