"""The worker loop: pull a job only when a slot is free, stream its deltas back, obey cancels.

Pulling (``receive()`` on the model's job channel once per free slot) leaves any backlog in the channel
layer, where another worker can take it; nothing is drained into this process's memory.
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

from channels.exceptions import ChannelFull

from tripod import events
from tripod.conf import WORKERS_GROUP
from tripod.engines.base import ChatModel, TokenStream
from tripod.errors import APIError, EngineFailure
from tripod.protocol import SamplingParams

logger = logging.getLogger(__name__)

# Remember cancels of jobs not pulled yet for this long (a job waits at most the queue timeout).
CANCEL_MEMORY_SECONDS = 600
_END = object()


class Worker:
    """Serves one model's job channel with ``slots`` concurrent generations."""

    def __init__(
        self,
        channel_layer,
        job_channel: str,
        load_model: Callable[[], ChatModel],
        slots: int,
        worker_id: str | None = None,
    ) -> None:
        self.layer = channel_layer
        self.job_channel = job_channel
        self.load_model = load_model
        self.slots = slots
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.control_channel: str | None = None
        self.running: dict[str, TokenStream] = {}
        self._cancelled: dict[str, float] = {}
        self._free = asyncio.Semaphore(slots)
        self._tasks: set[asyncio.Task] = set()
        # Engine iteration blocks on the engine's streamer, so each running job holds a thread.
        self._executor = ThreadPoolExecutor(max_workers=slots + 1, thread_name_prefix="tripod-worker")
        self._model: ChatModel | None = None
        self._model_lock = asyncio.Lock()

    async def run(self) -> None:
        """Serve until cancelled."""
        self.control_channel = await self.layer.new_channel("tripod.worker.")
        await self.layer.group_add(WORKERS_GROUP, self.control_channel)
        control = asyncio.create_task(self._listen_control())
        logger.info("worker %s serving %s with %d slots", self.id, self.job_channel, self.slots)
        try:
            while True:
                await self._free.acquire()
                try:
                    job = await self.layer.receive(self.job_channel)
                except BaseException:
                    self._free.release()
                    raise
                task = asyncio.create_task(self._serve(job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            control.cancel()
            for task in list(self._tasks):
                task.cancel()
            for stream in list(self.running.values()):
                stream.cancel()
            await asyncio.gather(control, *self._tasks, return_exceptions=True)
            try:
                await self.layer.group_discard(WORKERS_GROUP, self.control_channel)
            except Exception:  # noqa: BLE001 - best effort while shutting down
                pass
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _listen_control(self) -> None:
        while True:
            message = await self.layer.receive(self.control_channel)
            if message.get("type") == events.CANCEL:
                self.cancel(message.get("id", ""))

    def cancel(self, job_id: str) -> None:
        """Stop a running job, or remember to skip it if it is still waiting in the channel."""
        stream = self.running.get(job_id)
        if stream is not None:
            stream.cancel()
            return
        now = time.monotonic()
        self._cancelled = {k: t for k, t in self._cancelled.items() if t > now}
        self._cancelled[job_id] = now + CANCEL_MEMORY_SECONDS

    async def _model_instance(self) -> ChatModel:
        if self._model is None:
            async with self._model_lock:
                if self._model is None:
                    self._model = await asyncio.get_running_loop().run_in_executor(self._executor, self.load_model)
        return self._model

    async def _send(self, reply_channel: str, message: dict[str, Any]) -> bool:
        """Send an event; False when the reply channel is gone or full (its reader left)."""
        try:
            await self.layer.send(reply_channel, message)
            return True
        except ChannelFull:
            return False

    async def _serve(self, job: dict[str, Any]) -> None:
        job_id = str(job.get("id", ""))
        reply = job.get("reply_channel")
        try:
            if not reply or job.get("type") != events.JOB:
                logger.warning("dropping malformed job %r", job_id)
                return
            if self._cancelled.pop(job_id, None) is not None:
                return
            if job.get("deadline") and time.time() > float(job["deadline"]):
                # The client stopped waiting for a worker; nobody reads this reply channel any more.
                return
            await self._generate(job_id, reply, job)
        except APIError as exc:
            await self._send(reply, {"type": events.ERROR, "id": job_id, **exc.to_event()})
        except Exception as exc:  # noqa: BLE001 - a failed job must end its stream with an error
            logger.exception("job %s failed", job_id)
            error = EngineFailure(f"The engine failed: {exc}", code="engine_error")
            await self._send(reply, {"type": events.ERROR, "id": job_id, **error.to_event()})
        finally:
            self._free.release()

    async def _generate(self, job_id: str, reply: str, job: dict[str, Any]) -> None:
        model = await self._model_instance()
        loop = asyncio.get_running_loop()
        prompt = job.get("messages") if job.get("messages") is not None else job.get("prompt", "")
        params = SamplingParams.from_message(job.get("params") or {})
        stream = await loop.run_in_executor(self._executor, model.start, prompt, params)
        self.running[job_id] = stream
        try:
            started = {
                "type": events.STARTED,
                "id": job_id,
                "worker": self.id,
                "control": self.control_channel,
                "prompt_tokens": stream.prompt_tokens,
            }
            if not await self._send(reply, started):
                stream.cancel()
            await self._pump(job_id, reply, stream)
        finally:
            self.running.pop(job_id, None)

    async def _pump(self, job_id: str, reply: str, stream: TokenStream) -> None:
        """Relay deltas; whatever piled up while the last send was in flight goes out as one delta."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def produce() -> None:
            try:
                for delta in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        producer = loop.run_in_executor(self._executor, produce)
        seq = 0
        reader_gone = False
        try:
            finished = False
            while not finished:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                text, tokens = [], 0
                for item in items:
                    if item is _END:
                        finished = True
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        text.append(item.text)
                        tokens += item.tokens
                if (text or tokens) and not reader_gone:
                    delta = {"type": events.DELTA, "id": job_id, "text": "".join(text), "tokens": tokens, "seq": seq}
                    seq += 1
                    if not await self._send(reply, delta):
                        reader_gone = True
                        stream.cancel()
        finally:
            if not producer.done():
                stream.cancel()
            await asyncio.shield(producer)
        done = {
            "type": events.DONE,
            "id": job_id,
            "finish_reason": stream.finish_reason,
            "usage": stream.usage(),
        }
        if not reader_gone:
            await self._send(reply, done)
