"""The embedded default: the worker runs as an asyncio task inside the web process.

Without ``REDIS_URL`` the channel layer is in memory, so the worker must share the web process and its
event loop. It starts on the first request and loads the model on its first job.
"""

from __future__ import annotations

import asyncio
import weakref

from channels.layers import get_channel_layer

from asgi_worker.loop import Worker
from tripod.patches.request_threads import outlive_request

_workers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task] = weakref.WeakKeyDictionary()


def ensure_inline_worker() -> None:
    """Start this event loop's inline worker unless it is already running."""
    loop = asyncio.get_running_loop()
    task = _workers.get(loop)
    if task is not None and not task.done():
        return
    worker = Worker.from_settings(get_channel_layer())
    # Not in the first request's context: the worker must not inherit its request id or its thread.
    _workers[loop] = outlive_request(worker.run(), None, name="tripod-inline-worker")
