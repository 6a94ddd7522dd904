"""The worker loop: pull a job only when a slot is free, stream its deltas back, obey cancels.

``Worker`` ties the three parts together: pulling (``pull.py``: job channel reads, claims), running
(``run.py``: a job's generation, cancels and give-ups) and reporting (``report.py``: events out, heartbeats).
Nothing is drained into this process's memory, so a crash loses only the jobs that were running, and their
clients are told (``worker_lost``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgi_worker.pull import Claims, pull_jobs
from asgi_worker.report import heartbeat, send_event, watch_readers
from asgi_worker.run import Runs, listen_for_cancels
from tripod import job_protocol as wire
from tripod.conf import STREAM_INTERVAL_AUTO
from tripod.engines.base import ChatModel
from tripod.errors import APIError, EngineFailure
from tripod.observability import metrics
from tripod.observability.logs import REQUEST_ID
from tripod.registry import WorkerRegistry

logger = logging.getLogger(__name__)

# TRIPOD_STREAM_INTERVAL=auto: one more token per streamed chunk for each this many generations running on the
# worker, up to AUTO_MAX_INTERVAL.
AUTO_STREAMS_PER_TOKEN = 16
AUTO_MAX_INTERVAL = 4


def auto_stream_interval(generations: int) -> int:
    """Tokens per streamed chunk after the first, for ``TRIPOD_STREAM_INTERVAL=auto`` with ``generations`` running.

    Up to 16 generations every token goes out as it comes; 17 to 32 get chunks of 2, and so on up to 4. Each
    chunk costs the server about the same whatever it holds (an event through the channel layer, an SSE or
    WebSocket frame, a ``send`` system call), and the server shares the process, and Python's lock, with the
    engine's batching thread, so fewer, larger chunks leave it more time (measured in docs/BENCHMARKS.md,
    "``TRIPOD_STREAM_INTERVAL=auto``").
    """
    return max(1, min(AUTO_MAX_INTERVAL, -(-generations // AUTO_STREAMS_PER_TOKEN)))


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
        self.runs = Runs()
        self.running = self.runs.running
        self._readers = self.runs.readers
        self.claims = Claims(registry, self.id) if registry is not None else None
        self._free = asyncio.Semaphore(slots)
        self._tasks: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        # Loading the model and starting a generation (tokenizing, admitting it to the engine) block.
        self._executor = ThreadPoolExecutor(max_workers=slots + 2, thread_name_prefix="tripod-worker")
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

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self, drain_timeout: float = 0.0) -> None:
        """Serve until cancelled, or until ``stop()``: then finish running jobs (up to ``drain_timeout``)."""
        self.control_channel = await self.layer.new_channel(wire.CONTROL_CHANNEL_PREFIX)
        await self._join_group()
        background = [asyncio.create_task(self._listen_control())]
        if self.registry is not None:
            await self._model_instance()  # advertise only once the model can serve
            background.append(asyncio.create_task(self._heartbeat()))
            background.append(asyncio.create_task(self._watch_readers()))
        self._metric_labels = {"model": self.model_name or self.job_channel, "worker": self.id}
        metrics.WORKER_SLOTS.labels(**self._metric_labels).set(self.slots)
        logger.info("worker %s serving %s with %d slots", self.id, self.job_channel, self.slots)
        try:
            await pull_jobs(self.layer, self.job_channel, self._free, self._stopping, self._serve, self._tasks)
            await self._drain(drain_timeout)
        finally:
            for task in list(self._tasks):
                task.cancel()
            for stream in list(self.running.values()):
                stream.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._leave()
            self._executor.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        """Stop taking jobs (SIGTERM): jobs in flight finish, the backlog stays for other workers."""
        logger.info("worker %s stopping: %d jobs in flight", self.id, len(self.running))
        self._stopping.set()

    async def _drain(self, timeout: float) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(timeout, 0.001))
            if pending:
                logger.warning("drain timeout: aborting %d jobs", len(pending))
                self.runs.abort_all()
                await asyncio.wait(pending, timeout=10)

    async def _join_group(self) -> None:
        await self.layer.group_add(wire.WORKERS_GROUP, self.control_channel)

    async def _leave(self) -> None:
        try:
            if self.registry is not None:
                await self.registry.remove(self.id)
            await self.layer.group_discard(wire.WORKERS_GROUP, self.control_channel)
        except Exception:  # noqa: BLE001 - best effort while shutting down
            pass

    def info(self) -> dict[str, Any]:
        """This worker's heartbeat record."""
        beat = wire.WorkerBeat(
            id=self.id,
            model=self.model_name,
            engine=self.engine,
            slots=self.slots,
            busy=len(self.running),
            control=self.control_channel,
            host=socket.gethostname(),
            pid=os.getpid(),
            draining=self._stopping.is_set(),
        )
        return beat.to_record()

    async def _heartbeat(self) -> None:
        await heartbeat(self.registry, self.info, self._join_group, self.claims, self.runs, self.heartbeat_interval)

    async def _watch_readers(self) -> None:
        await watch_readers(self.registry, self.runs, self.heartbeat_interval)

    async def _listen_control(self) -> None:
        await listen_for_cancels(self.layer, self.control_channel, self.runs)

    def cancel(self, job_id: str) -> None:
        """Stop a running job, or remember to skip it if it is still waiting in the channel."""
        self.runs.cancel(job_id)

    # --- jobs ------------------------------------------------------------------------------------

    async def _model_instance(self) -> ChatModel:
        if self._model is None:
            async with self._model_lock:
                if self._model is None:
                    self._model = await asyncio.get_running_loop().run_in_executor(self._executor, self.load_model)
        return self._model

    async def _send(self, reply_channel: str, event: wire.Message) -> bool:
        return await send_event(self.layer, reply_channel, event)

    async def _serve(self, message: dict[str, Any]) -> None:
        try:
            job = wire.decode(message)
            if not isinstance(job, wire.Job):
                raise wire.ProtocolError(f"A job channel carries jobs, not '{job.TYPE}' messages.")
        except wire.ProtocolError as exc:
            await self._refuse(exc)
            return
        REQUEST_ID.set(str(job.request_id or job.id))  # this task's logs carry the request id
        try:
            if self.runs.was_cancelled(job.id):
                return
            if time.time() > job.deadline:
                # The client stopped waiting for a worker; nobody reads this reply channel any more.
                return
            if self.claims is not None and not await self.claims.claim(job.id):
                logger.info("job %s is served by another worker, ended, or given up", job.id)
                return
            await self._generate(job)
        except APIError as exc:
            await self._send(job.reply_channel, wire.Error.from_error(job.id, exc))
        except Exception as exc:  # noqa: BLE001 - a failed job must end its stream with an error
            logger.exception("job %s failed", job.id)
            error = EngineFailure(f"The engine failed: {exc}", code="engine_error")
            await self._send(job.reply_channel, wire.Error.from_error(job.id, error))
        finally:
            if self.claims is not None:
                await self.claims.release(job.id, job.deadline)
            self.runs.forget(job.id)
            self._free.release()

    async def _refuse(self, exc: wire.ProtocolError) -> None:
        """Answer a job this worker cannot read (``protocol_mismatch``: another version) where it says to."""
        try:
            logger.warning("refusing job %r: %s", exc.job_id, exc)
            if exc.reply_channel:
                await self._send(exc.reply_channel, exc.to_event())
        finally:
            self._free.release()

    async def _generate(self, job: wire.Job) -> None:
        model = await self._model_instance()
        stream = await self.runs.start(job, model, self._executor)
        metrics.WORKER_RUNNING.labels(**self._metric_labels).inc()
        try:
            started = wire.Started(job.id, self.id, self.control_channel, stream.prompt_tokens, stream.max_tokens)
            if self.claims is not None and not await self.claims.still_holds(job.id):
                # Stopped between the claim and here, long enough for the job to go to another worker or be given
                # up: its reply channel is someone else's now. The relay below sends nothing and frees the stream.
                logger.warning("job %s: lost its claim before it started; dropping it", job.id)
                self.runs.give_up(job.id)
            elif not await self._send(job.reply_channel, started):
                stream.cancel()
            interval, hold = self._stream_interval(job), float(job.stream_hold)
            await self.runs.relay(job.id, job.reply_channel, stream, self._send, interval, hold)
        finally:
            self.runs.end(job.id)
            metrics.WORKER_RUNNING.labels(**self._metric_labels).dec()
            metrics.WORKER_GENERATION_TOKENS.labels(**self._metric_labels).inc(stream.completion_tokens)
            logger.info(
                "job %s finished: finish_reason=%s prompt_tokens=%d completion_tokens=%d",
                job.id,
                stream.finish_reason or "cancelled",
                stream.prompt_tokens,
                stream.completion_tokens,
            )

    def _stream_interval(self, job: wire.Job) -> int | Callable[[], int]:
        """Tokens per delta after the first, as the job asks; for ``auto``, asked again before each delta."""
        interval = job.stream_interval
        if interval == STREAM_INTERVAL_AUTO:
            return lambda: auto_stream_interval(len(self.running))
        return int(interval)
