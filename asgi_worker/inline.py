"""The embedded default: the worker runs as an asyncio task inside the web process.

Without ``REDIS_URL`` the channel layer is in memory, so the worker must share the web process and its
event loop. It starts on the first request and loads the model on its first job.
"""

from __future__ import annotations

import asyncio
import weakref

from channels.layers import get_channel_layer

from asgi_worker.loop import Worker
from tripod.conf import config
from tripod.engines import engine_class, get_chat_model

_workers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task] = weakref.WeakKeyDictionary()


def ensure_inline_worker() -> None:
    """Start this event loop's inline worker unless it is already running."""
    loop = asyncio.get_running_loop()
    task = _workers.get(loop)
    if task is not None and not task.done():
        return
    cfg = config()
    worker = Worker(
        get_channel_layer(),
        cfg.job_channel,
        load_model=get_chat_model,
        slots=cfg.slots or engine_class(cfg.engine).default_slots,
        model_name=cfg.served_model_name,
        engine=cfg.engine,
    )
    _workers[loop] = loop.create_task(worker.run(), name="tripod-inline-worker")
