"""WebSocket ``/ws/chat/``: many generations per socket, each with a client-chosen id.

The protocol is in ``docs/websocket.md``. A bad frame gets an error frame and the socket stays open; a key
revoked while the socket is open gets an error frame and the socket closed (code ``KEY_REVOKED_CLOSE_CODE``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer

from consumers.jobs import GenerationJob
from tripod.accounts.keys import authenticate_async, websocket_token
from tripod.conf import config
from tripod.engines.base import Delta
from tripod.errors import APIError, EngineFailure, InvalidRequest
from tripod.observability.logs import REQUEST_ID, clean_request_id
from tripod.protocol import GenerationRequest, parse_chat_request, parse_completion_request, reject_lone_surrogates
from tripod.registry import REGISTRY_ERRORS, get_registry
from tripod.responses import chat_logprobs, completion_logprobs, tool_call_chunks

logger = logging.getLogger(__name__)
MAX_ID_LENGTH = 128
_FRAME_FIELDS = frozenset({"type", "id"})
# The close code of a socket whose key stopped being valid (revoked, expired, deleted): 4000 + HTTP's 401.
KEY_REVOKED_CLOSE_CODE = 4401


async def fair_share(model: str) -> int:
    """Generations one socket may run at once for ``model``: half the slots that serve it (at least one), so
    that a socket which never reads cannot hold every slot while other clients wait, and at most
    ``TRIPOD_WS_MAX_INFLIGHT``."""
    cfg = config()
    registry = get_registry()
    if registry is None:
        from tripod.engines import engine_class  # the embedded worker's engine: imported by now

        slots = cfg.slots or engine_class(cfg.engine).default_slots
    else:
        try:
            workers = await registry.workers()
        except REGISTRY_ERRORS:
            workers = []  # the job itself reports the outage
        slots = sum(worker.slots for worker in workers if worker.model == model and not worker.draining)
    return max(1, min(cfg.ws_max_inflight, slots // 2))


def delta_frame(request_id: Any, seq: int, delta: Delta, request: GenerationRequest) -> dict[str, Any]:
    """A ``delta`` frame: text and tokens, and where the request asks, its choice, tool calls and logprobs, in the
    shapes of OpenAI's chunks (``docs/websocket.md``)."""
    frame: dict[str, Any] = {"type": "delta", "id": request_id, "text": delta.text, "tokens": delta.tokens, "seq": seq}
    if request.params.n > 1:
        frame["index"] = delta.index
    if delta.tool_calls:
        frame["tool_calls"] = tool_call_chunks(delta.tool_calls)
    if request.params.logprobs:
        if request.kind == "chat":
            frame["logprobs"] = chat_logprobs(delta.logprobs)["content"]
        else:
            frame["logprobs"] = completion_logprobs(delta.logprobs)
    return frame


class ChatConsumer(AsyncWebsocketConsumer):
    """Runs each request frame as its own task, so that requests on one socket overlap."""

    # No channel-layer channel of its own: nothing sends to a socket through the layer (its jobs' events come on
    # their reply channels), and in scaled mode each consumer channel is one more blocking Redis reader in the
    # process. ``get_channel_layer`` answers None for an alias that is not configured.
    channel_layer_alias = None

    async def connect(self) -> None:
        self.jobs: dict[str, tuple[asyncio.Task, GenerationJob]] = {}
        subprotocols = self.scope.get("subprotocols") or []
        self.token = websocket_token(dict(self.scope.get("headers") or []), subprotocols)
        try:
            self.principal = await authenticate_async(self.token)
        except APIError:
            await self.close()  # refuses the handshake (HTTP 403); the key is never echoed
            return
        # A browser that sent its key as a subprotocol needs one protocol chosen back.
        await self.accept(subprotocol="tripod" if "tripod" in subprotocols else None)

    async def disconnect(self, code: int) -> None:
        # Nobody is left to read: stop every generation this socket started.
        tasks = [task for task, _ in getattr(self, "jobs", {}).values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def send_json(self, payload: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(payload, separators=(",", ":")))

    async def send_error(self, request_id: Any, error: APIError) -> None:
        await self.send_json({"type": "error", "id": request_id, **error.to_dict()})

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        request_id = None
        try:
            if text_data is None:
                raise InvalidRequest("Frames must be JSON text, not binary.", code="invalid_frame")
            limit = config().ws_max_frame_bytes
            if len(text_data) > limit or len(text_data.encode()) > limit:  # characters first: no copy when over
                raise APIError(f"The frame is larger than {limit} bytes.", code="frame_too_large", status=413)
            try:
                frame = json.loads(text_data)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge integers, deep nesting
                raise InvalidRequest(f"The frame is not valid JSON: {exc}", code="invalid_json") from None
            if not isinstance(frame, dict):
                raise InvalidRequest("A frame must be a JSON object.", code="invalid_frame")
            if isinstance(frame.get("id"), str):
                reject_lone_surrogates({"id": frame["id"]})  # before the id is echoed in any error frame
            request_id = frame.get("id")
            reject_lone_surrogates(frame)
            await self.handle_frame(frame)
        except APIError as error:
            await self.send_error(request_id, error)

    async def handle_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        request_id = frame.get("id")
        if (
            not isinstance(request_id, (str, int))
            or isinstance(request_id, bool)
            or len(str(request_id)) > MAX_ID_LENGTH
        ):
            raise InvalidRequest(
                f"Every frame needs an 'id' (a string or integer of at most {MAX_ID_LENGTH} characters).",
                param="id",
                code="invalid_id",
            )
        key = str(request_id)
        if kind == "cancel":
            entry = self.jobs.get(key)
            if entry is None:
                raise InvalidRequest(f"No request with id {request_id!r} is running.", param="id", code="unknown_id")
            task, job = entry
            if job.control_channel is None:
                # No worker has admitted it yet: drop it here (closing the job tells every worker to skip it).
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await self.send_json({"type": "done", "id": request_id, "finish_reason": "cancelled", "usage": None})
            else:
                # The worker stops within a step and still reports exact usage in its done frame.
                await job.cancel()
            return
        body = {k: v for k, v in frame.items() if k not in _FRAME_FIELDS}
        if kind in ("chat", "completion") and not await self.key_still_valid(request_id):
            return
        if kind == "chat":
            request = parse_chat_request(body, max_messages=config().max_messages, max_n=config().max_n)
        elif kind == "completion":
            request = parse_completion_request(body, max_n=config().max_n)
        else:
            raise InvalidRequest("'type' must be 'chat', 'completion' or 'cancel'.", param="type", code="invalid_frame")
        if key in self.jobs:
            raise InvalidRequest(
                f"A request with id {request_id!r} is already running.", param="id", code="duplicate_id"
            )
        limit = await fair_share(request.model or config().served_model_name)
        if len(self.jobs) >= limit:
            raise APIError(
                f"At most {limit} requests may run at once on one socket (half the model's slots, at most "
                f"TRIPOD_WS_MAX_INFLIGHT); wait for one to finish.",
                param="id",
                code="too_many_requests",
                status=429,
                type="rate_limit_error",
            )
        job = GenerationJob(request, self.principal, transport="ws", request_id=clean_request_id(None))
        task = asyncio.create_task(self.run_job(request_id, job))
        self.jobs[key] = (task, job)
        task.add_done_callback(lambda _: self.jobs.pop(key, None))

    async def key_still_valid(self, request_id: Any) -> bool:
        """Each new request checks the socket's key again (through the key cache), so a key revoked after the
        handshake stops working within the cache's lifetime, as on REST; then the socket closes."""
        try:
            self.principal = await authenticate_async(self.token)
        except APIError as error:
            await self.send_error(request_id, error)
            await self.close(code=KEY_REVOKED_CLOSE_CODE)
            return False
        return True

    async def run_job(self, request_id: Any, job: GenerationJob) -> None:
        """Frames for one request: start, deltas, done (or error)."""
        REQUEST_ID.set(job.request_id)  # this task's logs carry the request id
        async with job:
            try:
                await job.start()
                await self.send_json(
                    {
                        "type": "start",
                        "id": request_id,
                        "model": job.model,
                        "prompt_tokens": job.prompt_tokens,
                        "request_id": job.request_id,
                    }
                )
                seq = 0
                async for delta in job.deltas():
                    if delta is not None and (delta.text or delta.tool_calls or delta.logprobs):
                        await self.send_json(delta_frame(request_id, seq, delta, job.request))
                        seq += 1
                done = {
                    "type": "done",
                    "id": request_id,
                    "finish_reason": "cancelled" if job.cancelled else job.finish_reason,
                    "usage": job.usage,
                }
                if job.request.params.n > 1:
                    done["finish_reasons"] = [
                        "cancelled" if job.cancelled else job.finish_reasons[i] for i in range(job.request.params.n)
                    ]
                await self.send_json(done)
            except APIError as error:
                await self.send_error(request_id, error)
            except Exception:  # noqa: BLE001 - a request must end with a frame, whatever broke
                logger.exception("request %r failed", request_id)
                await self.send_error(
                    request_id, EngineFailure("The server failed while serving this request.", code="server_error")
                )
