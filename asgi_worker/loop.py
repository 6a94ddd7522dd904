"""The worker loop: pull a job only when a slot is free, stream its deltas back, obey cancels.

Pulling (``receive()`` on the model's job channel once per free slot) leaves any backlog in the channel
layer, where another worker can take it; nothing is drained into this process's memory, so a crash loses
only the jobs that were running, and their clients are told (``worker_lost``).

Each job is claimed in the registry before it starts, and the claim renewed with every heartbeat. A worker that
stopped (``SIGSTOP``, a stalled host) and resumes finds the claims of the jobs it was running gone to another worker
or marked abandoned by their clients, and stops those jobs instead of generating them for nobody.
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
from contextlib import aclosing
from functools import partial
from typing import Any

from channels.exceptions import ChannelFull

from tripod import job_protocol as wire
from tripod import metrics
from tripod.conf import STREAM_INTERVAL_AUTO
from tripod.engines.base import ChatModel, TokenStream
from tripod.errors import APIError, EngineFailure, ServiceUnavailable, channel_layer_unavailable
from tripod.logs import REQUEST_ID
from tripod.registry import REGISTRY_ERRORS, WorkerRegistry

logger = logging.getLogger(__name__)

# Remember cancels of jobs not pulled yet for this long (a job waits at most the queue timeout).
CANCEL_MEMORY_SECONDS = 600
RETRY_SECONDS = 0.5
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
        self.running: dict[str, TokenStream] = {}
        # The web process that reads each running job, where the job names one (scaled).
        self._readers: dict[str, str] = {}
        self._cancelled: dict[str, float] = {}
        self._aborted: set[str] = set()
        # Jobs claimed and not yet ended; those whose claim went elsewhere (given up: they end without a word).
        self._claimed: set[str] = set()
        self._given_up: set[str] = set()
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
            await self._pull_until_stopped()
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

    async def _pull_until_stopped(self) -> None:
        stop = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                acquire = asyncio.create_task(self._free.acquire())
                await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not acquire.done():
                    acquire.cancel()
                    break
                receive = asyncio.create_task(self.layer.receive(self.job_channel))
                await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    # channels_redis keeps a message popped by a cancelled receive in its backup queue.
                    receive.cancel()
                    self._free.release()
                    break
                try:
                    job = receive.result()
                except REGISTRY_ERRORS as exc:
                    self._free.release()
                    logger.warning("channel layer unavailable (%s); retrying", exc)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                task = asyncio.create_task(self._serve(job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            stop.cancel()

    async def _drain(self, timeout: float) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(timeout, 0.001))
            if pending:
                logger.warning("drain timeout: aborting %d jobs", len(pending))
                for job_id, stream in list(self.running.items()):
                    self._aborted.add(job_id)
                    stream.cancel()
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
        while True:
            try:
                await self.registry.beat(self.info())
                # Refresh group membership too: a restarted Redis has forgotten it.
                await self._join_group()
                await self._renew_claims()
            except REGISTRY_ERRORS as exc:
                logger.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.heartbeat_interval)

    async def _renew_claims(self) -> None:
        """Keep this worker's claims alive; stop the jobs whose claim it lost (given up while it was stopped)."""
        for job_id in await self.registry.renew_claims(sorted(self._claimed), self.id):
            logger.warning("job %s: its client gave it up or another worker took it; stopping it", job_id)
            self._give_up(job_id)

    def _give_up(self, job_id: str) -> None:
        """Stop a job that is no longer this worker's: no event of it may reach its reply channel any more."""
        self._given_up.add(job_id)
        stream = self.running.get(job_id)
        if stream is not None:
            stream.cancel()
        else:
            self.cancel(job_id)  # still loading or tokenizing: stopped as it starts

    async def _watch_readers(self) -> None:
        """Stop the jobs whose web process stopped beating: nobody can read them any more.

        A web process must be missing at two checks in a row: a restarted Redis has forgotten every key
        until the next beat.
        """
        missing: set[str] = set()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            webs = set(self._readers.values())
            if not webs:
                missing.clear()
                continue
            try:
                gone = webs - await self.registry.live_webs(webs)
            except REGISTRY_ERRORS as exc:
                logger.warning("could not check the web processes of running jobs: %s", exc)
                continue
            dead, missing = gone & missing, gone
            for job_id, web in list(self._readers.items()):
                stream = self.running.get(job_id)
                if web in dead and stream is not None:
                    logger.warning("job %s: its web process %s stopped beating; stopping the job", job_id, web)
                    self._readers.pop(job_id, None)
                    stream.cancel()

    async def _listen_control(self) -> None:
        while True:
            try:
                message = await self.layer.receive(self.control_channel)
            except REGISTRY_ERRORS:
                await asyncio.sleep(RETRY_SECONDS)
                continue
            try:
                cancel = wire.decode(message)
            except wire.ProtocolError as exc:
                logger.warning("ignoring a malformed control message: %s", exc)
                continue
            if isinstance(cancel, wire.Cancel):
                self.cancel(cancel.id)

    def cancel(self, job_id: str) -> None:
        """Stop a running job, or remember to skip it if it is still waiting in the channel."""
        stream = self.running.get(job_id)
        if stream is not None:
            stream.cancel()
            return
        now = time.monotonic()
        self._cancelled = {k: t for k, t in self._cancelled.items() if t > now}
        self._cancelled[job_id] = now + CANCEL_MEMORY_SECONDS

    # --- jobs ------------------------------------------------------------------------------------

    async def _model_instance(self) -> ChatModel:
        if self._model is None:
            async with self._model_lock:
                if self._model is None:
                    self._model = await asyncio.get_running_loop().run_in_executor(self._executor, self.load_model)
        return self._model

    async def _send(self, reply_channel: str, event: wire.Message) -> bool:
        """Send an event; False when the reply channel is full or unreachable (its reader is gone)."""
        try:
            await self.layer.send(reply_channel, wire.encode(event))
            return True
        except ChannelFull:
            return False
        except REGISTRY_ERRORS as exc:
            logger.warning("could not send to %s: %s", reply_channel, exc)
            return False

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
            if self._cancelled.pop(job.id, None) is not None:
                return
            if time.time() > job.deadline:
                # The client stopped waiting for a worker; nobody reads this reply channel any more.
                return
            if self.registry is not None:
                if not await self._claim(job.id):
                    logger.info("job %s is served by another worker, ended, or given up", job.id)
                    return
                self._claimed.add(job.id)
            await self._generate(job)
        except APIError as exc:
            await self._send(job.reply_channel, wire.Error.from_error(job.id, exc))
        except Exception as exc:  # noqa: BLE001 - a failed job must end its stream with an error
            logger.exception("job %s failed", job.id)
            error = EngineFailure(f"The engine failed: {exc}", code="engine_error")
            await self._send(job.reply_channel, wire.Error.from_error(job.id, error))
        finally:
            self._aborted.discard(job.id)
            if job.id in self._claimed:
                await self._release(job.id, job.deadline)
            self._given_up.discard(job.id)
            self._free.release()

    async def _refuse(self, exc: wire.ProtocolError) -> None:
        """Answer a job this worker cannot read (``protocol_mismatch``: another version) where it says to."""
        try:
            logger.warning("refusing job %r: %s", exc.job_id, exc)
            if exc.reply_channel:
                await self._send(exc.reply_channel, exc.to_event())
        finally:
            self._free.release()

    async def _release(self, job_id: str, deadline: float) -> None:
        self._claimed.discard(job_id)
        try:
            await self.registry.release(job_id, self.id, deadline)
        except REGISTRY_ERRORS as exc:  # the claim expires by itself
            logger.warning("job %s: could not end its claim: %s", job_id, exc)

    async def _still_holds(self, job_id: str) -> bool:
        try:
            return await self.registry.holds(job_id, self.id)
        except REGISTRY_ERRORS:
            return True  # the heartbeat's renewal checks again

    async def _claim(self, job_id: str) -> bool:
        try:
            return await self.registry.claim(job_id, self.id)
        except REGISTRY_ERRORS as exc:  # a 503 the client may retry, not an engine failure
            logger.warning("job %s: could not claim it: %s", job_id, exc)
            raise channel_layer_unavailable(exc) from None

    async def _generate(self, job: wire.Job) -> None:
        model = await self._model_instance()
        loop = asyncio.get_running_loop()
        job_id, reply = job.id, job.reply_channel
        limits = {"max_prompt_tokens": job.max_prompt_tokens, "max_tokens_cap": job.max_tokens_cap}
        stream = await loop.run_in_executor(self._executor, partial(model.start, job.input, job.params, **limits))
        self.running[job_id] = stream
        if job.web:
            self._readers[job_id] = job.web
        if self._cancelled.pop(job_id, None) is not None:
            stream.cancel()  # the client left while the job was loading or tokenizing
        metrics.WORKER_RUNNING.labels(**self._metric_labels).inc()
        try:
            started = wire.Started(job_id, self.id, self.control_channel, stream.prompt_tokens, stream.max_tokens)
            if self.registry is not None and not await self._still_holds(job_id):
                # Stopped between the claim and here, long enough for the job to go to another worker or be given
                # up: its reply channel is someone else's now. The pump below sends nothing and frees the stream.
                logger.warning("job %s: lost its claim before it started; dropping it", job_id)
                self._give_up(job_id)
            elif not await self._send(reply, started):
                stream.cancel()
            await self._pump(job_id, reply, stream, self._stream_interval(job), float(job.stream_hold))
        finally:
            self.running.pop(job_id, None)
            self._readers.pop(job_id, None)
            metrics.WORKER_RUNNING.labels(**self._metric_labels).dec()
            metrics.WORKER_GENERATION_TOKENS.labels(**self._metric_labels).inc(stream.completion_tokens)
            logger.info(
                "job %s finished: finish_reason=%s prompt_tokens=%d completion_tokens=%d",
                job_id,
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

    async def _pump(
        self, job_id: str, reply: str, stream: TokenStream, interval: int | Callable[[], int] = 1, hold: float = 0.0
    ) -> None:
        """Relay the stream's deltas, merged as the job asks (``interval`` and ``hold``: ``TokenStream.deltas_async``).

        Whatever arrived while the last send was in flight goes out as one delta.
        """
        seq = 0
        async with aclosing(stream.deltas_async(interval, hold)) as deltas:
            async for delta in deltas:
                message = wire.Delta(job_id, delta.text, delta.tokens, seq)
                seq += 1
                if job_id in self._given_up or not await self._send(reply, message):
                    return  # the reader is gone: leaving the loop cancels the generation
        if job_id in self._given_up:
            return  # not this worker's job any more: its client heard, or hears, from another
        if job_id in self._aborted:
            raise ServiceUnavailable("The worker shut down before this generation finished.", code="worker_shutdown")
        await self._send(reply, wire.Done(job_id, stream.finish_reason, stream.usage()))
