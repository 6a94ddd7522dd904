"""The ``openai`` engine: relay to any OpenAI-compatible server (vLLM, TGI, another Tripod).

A model that vLLM shards across several GPUs sits behind this server's API, limits and metrics
through one worker of this engine. Streaming is relayed as it arrives; cancelling closes the upstream
stream, which makes a well-behaved upstream stop generating.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import httpx

from tripod.engines.base import ChatModel, Delta, Prompt, RawGeneration
from tripod.errors import APIError, EngineFailure, ServiceUnavailable
from tripod.protocol import SamplingParams

logger = logging.getLogger(__name__)


def _upstream_error(response: httpx.Response) -> APIError:
    """Rebuild the upstream's OpenAI-shaped error, keeping its status, code and param.

    401, 403 and 404 from the upstream are this server's misconfiguration (its upstream key or model id),
    not the client's fault: they become 502 ``upstream_error``.
    """
    if response.status_code in (401, 403, 404):
        return EngineFailure(
            f"The upstream refused this server's request ({response.status_code}); check TRIPOD_UPSTREAM_URL, "
            "TRIPOD_UPSTREAM_API_KEY and the upstream model id.",
            code="upstream_error",
            status=502,
        )
    try:
        error = json.loads(response.read())["error"]
        message = error.get("message") or "upstream error"
        return APIError(
            message,
            param=error.get("param"),
            code=error.get("code"),
            status=response.status_code,
            type=error.get("type"),
        )
    except (ValueError, KeyError, TypeError):
        return EngineFailure(f"The upstream answered {response.status_code}.", code="upstream_error", status=502)


class RelayGeneration(RawGeneration):
    """One upstream SSE stream, read on the worker's thread."""

    def __init__(self, response: httpx.Response, kind: str) -> None:
        super().__init__()
        self.response = response
        self.kind = kind
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[Delta]:
        try:
            for line in self.response.iter_lines():
                if self.cancel_event.is_set():
                    return
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    error = chunk["error"]
                    raise EngineFailure(
                        f"Upstream error: {error.get('message')}", code=error.get("code") or "upstream_error"
                    )
                usage = chunk.get("usage")
                if usage:
                    self.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    self.completion_tokens = int(usage.get("completion_tokens", 0))
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if self.kind == "chat" else choice.get("text")
                    if choice.get("finish_reason"):
                        self.finish_reason = choice["finish_reason"]
                        self.eos = self.finish_reason == "stop"
                    if text:
                        yield Delta(text, 1)
        except httpx.HTTPError as exc:
            if not self.cancel_event.is_set():
                raise ServiceUnavailable(f"The upstream stream broke: {exc}", code="upstream_unavailable") from exc
        finally:
            self.response.close()

    def cancel(self) -> None:
        super().cancel()
        # Shutting the socket down wakes the reader blocked in recv() and tells the upstream its client left;
        # close() alone does neither while a recv() is pending.
        stream = self.response.extensions.get("network_stream")
        try:
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.response.close()


class OpenAIRelayModel(ChatModel):
    """A model served by an OpenAI-compatible upstream at ``TRIPOD_UPSTREAM_URL``."""

    engine = "openai"
    default_slots = 64

    def __init__(self, engine: str | None = None, model_name: str | None = None, **options: Any) -> None:
        super().__init__(engine, model_name, **options)
        self.upstream_model = options.get("path") or model_name
        self.base_url = (options.get("upstream_url") or "").rstrip("/")
        self.api_key = options.get("upstream_api_key") or ""
        self.step_timeout = float(options.get("step_timeout", 60.0))
        self.client: httpx.Client | None = None

    @property
    def can_generate(self) -> bool:
        return self.client is not None

    def load(self) -> None:
        if not self.base_url:
            raise ValueError("TRIPOD_ENGINE=openai needs TRIPOD_UPSTREAM_URL (e.g. http://vllm:8000/v1)")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(connect=5.0, read=self.step_timeout, write=30.0, pool=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        logger.info("relaying %s to %s (upstream model %s)", self.model_name, self.base_url, self.upstream_model)

    def _body(self, prompt: Prompt, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if isinstance(prompt, str):
            body["prompt"] = prompt
        else:
            body["messages"] = prompt
        optional = {
            "max_tokens": params.max_tokens,
            "stop": list(params.stop) or None,
            "seed": params.seed,
            "presence_penalty": params.presence_penalty or None,
            "frequency_penalty": params.frequency_penalty or None,
            # Extensions vLLM and Tripod know; sent only when asked for, since OpenAI itself refuses them.
            "top_k": params.top_k or None,
            "ignore_eos": params.ignore_eos or None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    def _start_raw(
        self,
        prompt: Prompt,
        params: SamplingParams,
        max_prompt_tokens: int | None = None,
        max_tokens_cap: int | None = None,
    ) -> tuple[RawGeneration, int]:
        # Prompt lengths are the upstream's to check: only it has the tokenizer.
        kind = "completion" if isinstance(prompt, str) else "chat"
        path = "/completions" if kind == "completion" else "/chat/completions"
        body = self._body(prompt, params)
        if params.max_tokens is None and max_tokens_cap:
            body["max_tokens"] = max_tokens_cap
        request = self.client.build_request("POST", path, json=body)
        try:
            response = self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"The upstream is unreachable: {exc}", code="upstream_unavailable") from exc
        if response.status_code != 200:
            try:
                raise _upstream_error(response)
            finally:
                response.close()
        return RelayGeneration(response, kind), params.max_tokens or 0
