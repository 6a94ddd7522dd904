"""OpenAI-compatible endpoints: DRF views. The ones that reach the worker are async (``AsyncAPIView``) and
never leave the event loop; ``stream: true`` answers with the SSE response of :mod:`consumers.sse`."""

from __future__ import annotations

import time

from asgiref.sync import async_to_sync
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from consumers import resumable, sse
from consumers.jobs import GenerationJob
from consumers.served_models import served_models
from tripod import streams
from tripod.accounts import usage
from tripod.api import schema
from tripod.api.negotiation import IgnoreAccept
from tripod.conf import config
from tripod.errors import APIError, InvalidRequest, ModelNotFound
from tripod.observability import metrics, readiness
from tripod.patches.drf_async_view import AsyncAPIView
from tripod.protocol import GenerationRequest, parse_chat_request, parse_completion_request

_STARTED = int(time.time())


def _content_length(request: Request) -> None:
    declared = request.META.get("CONTENT_LENGTH")
    limit = config().max_body_bytes
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(f"The request body is larger than {limit} bytes.", code="request_too_large", status=413)


async def _complete(job: GenerationJob) -> dict:
    async with job:
        reply = await job.result()
    reasons = [job.finish_reasons[i] for i in range(job.request.params.n)]
    return reply.completion(job.request.kind, model=job.model, finish_reasons=reasons, usage=job.usage)


async def _start(job: GenerationJob) -> None:
    try:
        await job.start()
    except BaseException:
        await job.close()
        raise


class GenerationView(AsyncAPIView):
    """Shared by chat and text completions: validate, submit, answer in one piece or as SSE."""

    content_negotiation_class = IgnoreAccept  # SSE clients send Accept: text/event-stream, streaming or not

    def parse(self, data) -> GenerationRequest:
        raise NotImplementedError

    async def post(self, request: Request) -> Response:
        _content_length(request)
        if request.stream is None:
            # DRF skips the parser for an empty body and hands back an empty dict.
            raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
        generation = self.parse(request.data)
        job = GenerationJob(
            generation,
            request.user,
            transport="sse" if generation.stream else "rest",
            request_id=getattr(request, "request_id", None),
        )
        if generation.stream:
            await _start(job)
            return sse.streaming_response(job)
        return Response(await _complete(job))


@extend_schema_view(
    post=extend_schema(
        summary="Create a chat completion",
        operation_id="createChatCompletion",
        request={"application/json": schema.CHAT_REQUEST},
        responses=schema.generation_responses(schema.CHAT_COMPLETION),
    )
)
class ChatCompletionsView(GenerationView):
    """``POST /v1/chat/completions`` (and the seed's ``/api/chat/completions``)."""

    def parse(self, data) -> GenerationRequest:
        return parse_chat_request(data, max_messages=config().max_messages, max_n=config().max_n)


@extend_schema_view(
    post=extend_schema(
        summary="Create a text completion",
        operation_id="createCompletion",
        request={"application/json": schema.COMPLETION_REQUEST},
        responses=schema.generation_responses(schema.TEXT_COMPLETION),
    )
)
class CompletionsView(GenerationView):
    """``POST /v1/completions``: a raw prompt, no chat template."""

    def parse(self, data) -> GenerationRequest:
        return parse_completion_request(data, max_n=config().max_n)


@extend_schema_view(
    post=extend_schema(
        summary="Start a resumable stream",
        operation_id="createStream",
        description=(
            "Starts a chat completion and answers once a worker has admitted it, with a signed URL that an "
            "`EventSource` can read (no headers needed) and reconnect to without losing or repeating a frame."
        ),
        request={"application/json": schema.CHAT_REQUEST},
        responses={
            (201, "application/json"): OpenApiResponse(schema.STREAM),
            **{k: v for k, v in schema.generation_responses(schema.CHAT_COMPLETION).items() if k[0] != 200},
        },
    )
)
class StreamCreateView(AsyncAPIView):
    """``POST /v1/streams``: a chat completion whose frames are kept for readers that come and go."""

    content_negotiation_class = IgnoreAccept

    async def post(self, request: Request) -> Response:
        _content_length(request)
        if request.stream is None:
            raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
        if not isinstance(request.data, dict):
            raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
        cfg = config()
        generation = parse_chat_request(
            {**request.data, "stream": True}, max_messages=cfg.max_messages, max_n=cfg.max_n
        )
        job = GenerationJob(generation, request.user, transport="sse", request_id=getattr(request, "request_id", None))
        await _start(job)
        return Response(await resumable.begin(job), status=201)


def _resume_after(request: Request) -> int:
    raw = request.META.get("HTTP_LAST_EVENT_ID") or request.query_params.get("last_event_id") or "0"
    if not raw.isdigit() or len(raw) > 12:
        raise InvalidRequest(
            f"'Last-Event-ID' must be a frame id (a non-negative integer), not {raw[:40]!r}.",
            param="Last-Event-ID",
            code="invalid_last_event_id",
        )
    return int(raw)


def _stream_info(stream_id: str, request: Request) -> streams.StreamInfo:
    streams.verify(stream_id, request.query_params.get("token"))
    info = async_to_sync(streams.get_store().info)(stream_id)
    if info is None:
        raise APIError(f"Stream {stream_id} has expired or never existed.", code="stream_not_found", status=404)
    return info


@extend_schema_view(
    get=extend_schema(
        summary="Read a resumable stream",
        operation_id="readStream",
        parameters=[
            OpenApiParameter("token", str, required=True, description="From the `url` that created the stream."),
            OpenApiParameter("last_event_id", int, description="Resume after this frame (or `Last-Event-ID`)."),
        ],
        responses={
            (200, "text/event-stream"): OpenApiResponse(schema.RESUMABLE_EVENT_STREAM),
            204: OpenApiResponse(description="The stream ended at or before `Last-Event-ID`: nothing to resume."),
            **{(s, "application/json"): schema.ERROR_RESPONSES[s] for s in (400, 403)},
            (404, "application/json"): OpenApiResponse(schema.ERROR, description="Unknown or expired stream."),
        },
        auth=[],
    ),
    delete=extend_schema(
        summary="Cancel a resumable stream",
        operation_id="cancelStream",
        parameters=[OpenApiParameter("token", str, required=True)],
        responses={
            200: OpenApiResponse(schema.STREAM),
            403: schema.ERROR_RESPONSES[403],
            404: OpenApiResponse(schema.ERROR, description="Unknown or expired stream."),
        },
        auth=[],
    ),
)
class StreamView(APIView):
    """``GET``/``DELETE /v1/streams/<id>?token=…``: the signed token is the credential (EventSource cannot
    send an Authorization header), and it grants this one stream only."""

    authentication_classes: list = []
    permission_classes: list = []
    content_negotiation_class = IgnoreAccept  # EventSource asks for text/event-stream; errors are JSON

    def get(self, request: Request, stream_id: str) -> HttpResponse:
        after = _resume_after(request)
        info = _stream_info(stream_id, request)
        if info.last_id is not None and after >= info.last_id:
            return HttpResponse(status=204)  # tells EventSource to stop reconnecting
        return sse.event_stream_response(resumable.replay(stream_id, after))

    def delete(self, request: Request, stream_id: str) -> Response:
        info = _stream_info(stream_id, request)
        async_to_sync(resumable.cancel)(info)
        return Response({"id": stream_id, "object": "stream", "model": info.model, "cancelled": info.last_id is None})


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "tripod"}


@extend_schema_view(
    get=extend_schema(
        summary="List models", operation_id="listModels", responses=schema.plain_responses(schema.MODEL_LIST, 401)
    )
)
class ModelListView(AsyncAPIView):
    """``GET /v1/models``: the models a request can name now (scaled: those with a live worker)."""

    async def get(self, request: Request) -> Response:
        models = await served_models()
        return Response({"object": "list", "data": [_model_card(name) for name in models]})


@extend_schema_view(
    get=extend_schema(
        summary="Retrieve a model",
        operation_id="retrieveModel",
        responses=schema.plain_responses(schema.MODEL, 401, 404),
    )
)
class ModelDetailView(AsyncAPIView):
    """``GET /v1/models/<id>``."""

    async def get(self, request: Request, model: str) -> Response:
        if model not in await served_models():
            raise ModelNotFound(model)
        return Response(_model_card(model))


@extend_schema_view(
    get=extend_schema(
        summary="Usage of the calling key",
        operation_id="getUsage",
        responses=schema.plain_responses(schema.USAGE_LIST, 401, 404),
    )
)
class UsageView(APIView):
    """``GET /v1/usage``: the calling key's requests and tokens per day (last 30 days)."""

    def get(self, request: Request) -> Response:
        principal = request.user
        if principal.key_id is None:
            raise APIError(
                "Usage is kept per stored API key; this request was not made with one.",
                code="no_usage_for_caller",
                status=404,
            )
        return Response({"object": "list", "key": principal.name, "data": usage.for_key(principal.key_id)})


@extend_schema_view(
    get=extend_schema(
        summary="Liveness", operation_id="health", responses=schema.plain_responses(schema.HEALTH), auth=[]
    )
)
class HealthView(APIView):
    """``GET /healthz``: the process is up and answering."""

    authentication_classes: list = []
    permission_classes: list = []

    def get(self, request: Request) -> Response:
        return Response({"status": "ok"})


@extend_schema_view(
    get=extend_schema(
        summary="Readiness",
        operation_id="ready",
        responses={200: OpenApiResponse(schema.READY), 503: OpenApiResponse(schema.READY)},
        auth=[],
    )
)
class ReadyView(APIView):
    """``GET /readyz``: 200 when requests can be served now, else 503 with what is missing."""

    authentication_classes: list = []
    permission_classes: list = []

    def get(self, request: Request) -> Response:
        checks = readiness.check()
        missing = [name for name, result in checks.items() if not result["ok"]]
        body = {"status": "not_ready" if missing else "ready", "missing": missing, "checks": checks}
        return Response(body, status=503 if missing else 200)


@extend_schema(exclude=True)
class MetricsView(APIView):
    """``GET /metrics``: Prometheus exposition of this process (or of all, in multiprocess mode)."""

    def get(self, request: Request) -> HttpResponse:
        body, content_type = metrics.render()
        return HttpResponse(body, content_type=content_type)
