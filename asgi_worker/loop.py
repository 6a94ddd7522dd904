"""The worker: pull a job only when a slot is free, serve it, obey cancels, beat while alive, drain on SIGTERM.

``Worker`` holds the process's lifecycle and ties its parts together: pulling (``pull.py``: job channel reads,
claims), serving each job (``serve.py``), running generations (``run.py``: relays, cancels, give-ups) and reporting
(``report.py``: events out, heartbeats). Nothing is drained into memory, so a crash loses only the jobs that were
running, and their clients are told (``worker_lost``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from asgi_worker.pull import Claims, pull_jobs
from asgi_worker.report import heartbeat, watch_readers
from asgi_worker.run import Runs, listen_for_cancels
from asgi_worker.serve import serve
from tripod import job_protocol as wire
from tripod.engines.base import ChatModel
from tripod.observability import metrics
from tripod.registry import WorkerRegistry

logger = logging.getLogger(__name__)


class Worker:
    """Serves one model's job channel with ``slots`` concurrent generations."""

    def __init__(
        self,
        channel_layer,
        job_channel: str,
        load_model: Callable[[], ChatModel],
        slots: int,
        *,
        model_name: str = "",
        engine: str = "",
        registry: WorkerRegistry | None = None,
        heartbeat_interval: float = 1.0,
        worker_id: str | None = None,
    ) -> None:
        self.layer = channel_layer
        self.job_channel = job_channel
        self.load_model = load_model
        self.slots = slots
        self.model_name = model_name
        self.engine = engine
        self.registry = registry
        self.heartbeat_interval = heartbeat_interval
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.control_channel: str | None = None
        self.metric_labels = {"model": model_name or job_channel, "worker": self.id}
        self.runs = Runs()
        self.claims = Claims(registry, self.id) if registry is not None else None
        self.free_slots = asyncio.Semaphore(slots)
        # Loading the model and starting a generation (tokenizing, admitting it to the engine) block.
        self.executor = ThreadPoolExecutor(max_workers=slots + 2, thread_name_prefix="tripod-worker")
        self._tasks: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._model: ChatModel | None = None
        self._model_lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, channel_layer, registry: WorkerRegistry | None = None) -> Worker:
        """The worker for this process's settings (``TRIPOD_MODEL``, ``TRIPOD_ENGINE``, ``TRIPOD_SLOTS``, ...)."""
        from tripod.conf import config
        from tripod.engines import engine_class, get_chat_model

        cfg = config()
        return cls(
            channel_layer,
            cfg.job_channel,
            load_model=get_chat_model,
            slots=cfg.slots or engine_class(cfg.engine).default_slots,
            model_name=cfg.served_model_name,
            engine=cfg.engine,
            registry=registry,
            heartbeat_interval=cfg.heartbeat_interval,
        )

    async def run(self, drain_timeout: float = 0.0) -> None:
        """Serve until cancelled, or until ``stop()``: then finish running jobs (up to ``drain_timeout``)."""
        self.control_channel = await self.layer.new_channel(wire.CONTROL_CHANNEL_PREFIX)
        await self._join_group()
        background = await self._start_background()
        metrics.WORKER_SLOTS.labels(**self.metric_labels).set(self.slots)
        logger.info("worker %s serving %s with %d slots", self.id, self.job_channel, self.slots)
        try:
            await pull_jobs(
                self.layer, self.job_channel, self.free_slots, self._stopping, partial(serve, self), self._tasks
            )
            await self._drain(drain_timeout)
        finally:
            await self._shut_down(background)

    def stop(self) -> None:
        """Stop taking jobs (SIGTERM): jobs in flight finish, the backlog stays for other workers."""
        logger.info("worker %s stopping: %d jobs in flight", self.id, len(self.runs.running))
        self._stopping.set()

    async def model(self) -> ChatModel:
        """The engine, loaded on first use, once (on the executor: loading blocks)."""
        if self._model is None:
            async with self._model_lock:
                if self._model is None:
                    self._model = await asyncio.get_running_loop().run_in_executor(self.executor, self.load_model)
        return self._model

    def beat(self) -> wire.WorkerBeat:
        """What this worker's heartbeat says of it now."""
        return wire.WorkerBeat(
            id=self.id,
            model=self.model_name,
            engine=self.engine,
            slots=self.slots,
            busy=len(self.runs.running),
            control=self.control_channel,
            host=socket.gethostname(),
            pid=os.getpid(),
            draining=self._stopping.is_set(),
        )

    async def _start_background(self) -> list[asyncio.Task]:
        """The cancel listener and, scaled, the heartbeat and the watch on web processes."""
        tasks = [asyncio.create_task(listen_for_cancels(self.layer, self.control_channel, self.runs))]
        if self.registry is not None:
            await self.model()  # advertise only once the model can serve
            beats = heartbeat(
                self.registry, self.beat, self._join_group, self.claims, self.runs, self.heartbeat_interval
            )
            tasks.append(asyncio.create_task(beats))
            tasks.append(asyncio.create_task(watch_readers(self.registry, self.runs, self.heartbeat_interval)))
        return tasks

    async def _drain(self, timeout: float) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(timeout, 0.001))
            if pending:
                logger.warning("drain timeout: aborting %d jobs", len(pending))
                self.runs.abort_all()
                await asyncio.wait(pending, timeout=10)

    async def _shut_down(self, background: list[asyncio.Task]) -> None:
        for task in list(self._tasks):
            task.cancel()
        for stream in list(self.runs.running.values()):
            stream.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self._leave()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _join_group(self) -> None:
        await self.layer.group_add(wire.WORKERS_GROUP, self.control_channel)

    async def _leave(self) -> None:
        try:
            if self.registry is not None:
                await self.registry.remove(self.id)
            await self.layer.group_discard(wire.WORKERS_GROUP, self.control_channel)
        except Exception:  # noqa: BLE001 - best effort while shutting down
            pass
