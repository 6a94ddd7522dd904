"""The ``openai`` engine: relay to any OpenAI-compatible server (vLLM, TGI, another Tripod).

A model that vLLM shards across several GPUs sits behind this server's API, limits and metrics
through one worker of this engine. Streaming is relayed as it arrives; cancelling closes the upstream
stream, which makes a well-behaved upstream stop generating. The upstream makes the ``n`` choices, enforces
``response_format`` and parses tool calls itself: each field goes upstream as OpenAI names it, and what comes back
is relayed in the deltas' ``index``, ``tool_calls`` and ``logprobs`` (``emits_choices``).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import httpx

from tripod.engines.base import ChatModel, Delta, Prompt, RawGeneration, TokenLogprob, ToolCallDelta
from tripod.errors import APIError, EngineFailure, ServiceUnavailable
from tripod.protocol import ResponseFormat, SamplingParams, ToolUse

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


def _utf8(token: str) -> tuple[int, ...]:
    return tuple(token.encode("utf-8", "surrogatepass"))


def _chat_logprobs(logprobs: dict[str, Any] | None) -> tuple[TokenLogprob, ...]:
    """A chat choice's ``logprobs.content`` entries (``bytes`` may be null: then the token's UTF-8)."""

    def token_bytes(entry: dict[str, Any]) -> tuple[int, ...]:
        raw = entry.get("bytes")
        return tuple(raw) if raw is not None else _utf8(entry["token"])

    return tuple(
        TokenLogprob(
            token=entry["token"],
            bytes=token_bytes(entry),
            logprob=float(entry["logprob"]),
            top=tuple(
                (top["token"], token_bytes(top), float(top["logprob"])) for top in entry.get("top_logprobs") or ()
            ),
        )
        for entry in (logprobs or {}).get("content") or ()
    )


def _completion_logprobs(logprobs: dict[str, Any] | None) -> tuple[TokenLogprob, ...]:
    """A text completion choice's parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs`` dicts)."""
    logprobs = logprobs or {}
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    return tuple(
        TokenLogprob(
            token=token,
            bytes=_utf8(token),
            logprob=float(value),
            top=tuple((text, _utf8(text), float(lp)) for text, lp in (top or {}).items()),
        )
        for token, value, top in zip(tokens, values, tops, strict=False)
    )


def _tool_call_deltas(delta: dict[str, Any]) -> tuple[ToolCallDelta, ...]:
    """The upstream's ``delta.tool_calls`` pieces, as parsed by the upstream."""
    pieces = []
    for call in delta.get("tool_calls") or ():
        function = call.get("function") or {}
        pieces.append(
            ToolCallDelta(
                index=int(call.get("index", 0)),
                id=call.get("id"),
                name=function.get("name"),
                arguments=function.get("arguments") or "",
            )
        )
    return tuple(pieces)


def _response_format(response_format: ResponseFormat) -> dict[str, Any]:
    """OpenAI's ``response_format``; the schema travels as parsed JSON, as the client sent it."""
    if response_format.type == "json_object":
        return {"type": "json_object"}
    # OpenAI and vLLM both require a name; a client that gave none gets OpenAI's example name.
    spec: dict[str, Any] = {"name": response_format.name or "response", "strict": response_format.strict}
    if response_format.schema is not None:
        spec["schema"] = json.loads(response_format.schema)
    return {"type": "json_schema", "json_schema": spec}


def _tools(tool_use: ToolUse) -> dict[str, Any]:
    """OpenAI's ``tools``, ``tool_choice`` and (when calls may not run in parallel) ``parallel_tool_calls``."""
    tools = []
    for tool in tool_use.tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        function["parameters"] = json.loads(tool.parameters)
        if tool.strict:
            function["strict"] = True
        tools.append({"type": "function", "function": function})
    if tool_use.choice == "function":
        choice: Any = {"type": "function", "function": {"name": tool_use.function}}
    else:
        choice = tool_use.choice
    fields: dict[str, Any] = {"tools": tools, "tool_choice": choice}
    if not tool_use.parallel:
        fields["parallel_tool_calls"] = False
    return fields


class RelayGeneration(RawGeneration):
    """One upstream SSE stream, read on the worker's thread; its deltas carry the upstream's choice index.

    A delta counts one token per upstream chunk with content or tool calls (vLLM sends one per decode step),
    or, when the request asked for logprobs, one per logprob entry, so ``tokens`` and ``logprobs`` agree.
    """

    def __init__(self, response: httpx.Response, kind: str, logprobs: bool = False) -> None:
        super().__init__()
        self.response = response
        self.kind = kind
        self.logprobs = logprobs
        self.finish_reason: str | None = None
        self.finish_reasons: dict[int, str] = {}

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
                    delta = self._delta(choice)
                    if delta is not None:
                        yield delta
        except httpx.HTTPError as exc:
            if not self.cancel_event.is_set():
                raise ServiceUnavailable(f"The upstream stream broke: {exc}", code="upstream_unavailable") from exc
        finally:
            self.response.close()

    def _delta(self, choice: dict[str, Any]) -> Delta | None:
        """One choice of one upstream chunk; records its finish reason, returns what it generated (if anything)."""
        index = int(choice.get("index", 0))
        if self.kind == "chat":
            message = choice.get("delta") or {}
            text = message.get("content") or ""
            tool_calls = _tool_call_deltas(message)
            logprobs = _chat_logprobs(choice.get("logprobs")) if self.logprobs else ()
        else:
            text = choice.get("text") or ""
            tool_calls = ()
            logprobs = _completion_logprobs(choice.get("logprobs")) if self.logprobs else ()
        reason = choice.get("finish_reason")
        if reason:
            self.finish_reasons[index] = reason
            if index == 0:
                self.finish_reason = reason
                # The model ended its reply itself: with text, or with the calls it made.
                self.eos = reason in ("stop", "tool_calls")
        if not (text or tool_calls or logprobs):
            return None
        tokens = len(logprobs) if self.logprobs else 1
        return Delta(text, tokens, logprobs=logprobs, tool_calls=tool_calls, index=index)

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
    emits_choices = True  # the upstream makes the n choices and parses tool calls; we relay them as they come

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
        if params.n != 1:
            body["n"] = params.n
        if params.logprobs:
            if isinstance(prompt, str):
                body["logprobs"] = params.top_logprobs  # text completions: how many alternatives, 0 for none
            else:
                body["logprobs"] = True
                if params.top_logprobs:
                    body["top_logprobs"] = params.top_logprobs
        if params.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
        if params.response_format is not None:
            body["response_format"] = _response_format(params.response_format)
        if params.tools is not None:
            body.update(_tools(params.tools))
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
        return RelayGeneration(response, kind, logprobs=params.logprobs), params.max_tokens or 0
