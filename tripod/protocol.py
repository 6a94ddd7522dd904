"""OpenAI request bodies, validated once at the edge into typed objects the inside trusts.

Every rejection names the field at fault (``param``) the way OpenAI does, e.g. ``messages[2].role``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from tripod.errors import InvalidRequest

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STOP_SEQUENCES = 4
MAX_TOKENS_LIMIT = 1 << 31
SEED_MODULUS = 1 << 63
DEFAULT_MAX_N = 8  # TRIPOD_MAX_N
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024

# Accepted and ignored: they change nothing about the generated text.
_IGNORED_FIELDS = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
}


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output: any JSON object (``json_object``), or JSON valid for ``schema`` (``json_schema``)."""

    type: Literal["json_object", "json_schema"]
    schema: str | None = None  # the JSON Schema as JSON text; None for json_object
    name: str = ""
    strict: bool = False


@dataclass(frozen=True)
class Tool:
    """One function the model may call; ``parameters`` is its JSON Schema as JSON text."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'
    strict: bool = False

    def as_template_tool(self) -> dict[str, Any]:
        """The OpenAI tool object chat templates take (``apply_chat_template(tools=...)``)."""
        import json

        function = {"name": self.name, "description": self.description, "parameters": json.loads(self.parameters)}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and how it lets the model use them (``tool_choice`` "none" offers none).

    ``choice``: "auto" (the model decides), "required" (at least one call) or "function" (exactly one call of
    ``function``); the last two are forced by the grammar. ``parallel``: whether a reply may hold several calls.
    """

    tools: tuple[Tool, ...]
    choice: Literal["auto", "required", "function"] = "auto"
    function: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice != "auto"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; ``max_tokens=None`` means "up to the context length"."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    n: int = 1  # choices, each sampled with seed + its index when a seed is given
    logprobs: bool = False  # each token's log-probability, and ``top_logprobs`` alternatives
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias -100..100), sorted by id
    response_format: ResponseFormat | None = None
    tools: ToolUse | None = None

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows; it is greedy in effect (vLLM's threshold).
        return self.temperature < 1e-5


@dataclass(frozen=True)
class GenerationRequest:
    """A validated chat or text completion request."""

    kind: Literal["chat", "completion"]
    model: str | None
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    stream: bool = False
    include_usage: bool = False
    user: str | None = None


def _escaped(text: str) -> str:
    """``text`` with each lone surrogate written as its ``\\udXXX`` escape: what an error may say of it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def reject_lone_surrogates(body: Any) -> None:
    """Refuse a decoded JSON body in which any string, a value or a field name, holds a lone UTF-16 surrogate.

    JSON's ``\\ud800`` escape can carry one, UTF-8 cannot: left in, it fails later in the tokenizer, in the
    channel layer's msgpack or in the renderer, as a 500. The edges (the REST parser, the WebSocket frame
    reader) call this once, before anything else reads the body; ``param`` is the field's path.
    """
    pending: list[tuple[str, Any]] = [("", body)]
    while pending:  # a loop, not recursion: the body may nest as deep as the JSON reader allowed
        where, value = pending.pop()
        if isinstance(value, str):
            if _lone_surrogate(value):
                subject = f"'{where}'" if where else "The request body"
                raise InvalidRequest(
                    f"{subject} is not valid Unicode: it holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                    "escape that is not half of a pair).",
                    param=where or None,
                    code="invalid_unicode",
                )
        elif isinstance(value, dict):
            children = []
            for key, item in value.items():
                if _lone_surrogate(key):  # JSON object keys are strings
                    name = f"{where}.{_escaped(key)}" if where else _escaped(key)
                    raise InvalidRequest(
                        f"The field name '{name}' is not valid Unicode: it holds a lone UTF-16 surrogate.",
                        param=name,
                        code="invalid_unicode",
                    )
                children.append((f"{where}.{key}" if where else key, item))
            pending.extend(reversed(children))
        elif isinstance(value, list):
            pending.extend(reversed([(f"{where}[{i}]", item) for i, item in enumerate(value)]))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise InvalidRequest(f"'{name}' must be a number, got {type(value).__name__}.", param=name, code="invalid_type")
    if not low <= value <= high:
        raise InvalidRequest(
            f"'{name}' must be between {low:g} and {high:g}, got {value!r}.", param=name, code="invalid_value"
        )
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(
            f"'{name}' must be a boolean, got {type(value).__name__}.", param=name, code="invalid_type"
        )
    return value


def _max_tokens(body: dict, default: int | None) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise InvalidRequest(
            f"'{name}' must be an integer, got {type(value).__name__}.", param=name, code="invalid_type"
        )
    if value < 1:
        raise InvalidRequest(f"'{name}' must be at least 1, got {value}.", param=name, code="invalid_value")
    if value >= MAX_TOKENS_LIMIT:
        raise InvalidRequest(f"'{name}' is too large: {value}.", param=name, code="invalid_value")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("'stop' must be a string or a list of strings.", param="stop", code="invalid_type")
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(value)}.",
            param="stop",
            code="invalid_value",
        )
    if any(s == "" for s in value):
        raise InvalidRequest("'stop' sequences must not be empty.", param="stop", code="invalid_value")
    return tuple(dict.fromkeys(value))


def _seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not _is_int(value):
        raise InvalidRequest(
            f"'seed' must be an integer, got {type(value).__name__}.", param="seed", code="invalid_type"
        )
    if not -(1 << 63) <= value < (1 << 64):
        raise InvalidRequest("'seed' must fit in 64 bits.", param="seed", code="invalid_value")
    return value % SEED_MODULUS


def _n(body: dict, max_n: int) -> int:
    value = body.get("n")
    if value is None:
        return 1
    if not _is_int(value) or value < 1:
        raise InvalidRequest("'n' must be a positive integer.", param="n", code="invalid_value")
    if value > max_n:
        raise InvalidRequest(
            f"'n' is {value}; this server makes at most {max_n} choices per request (TRIPOD_MAX_N).",
            param="n",
            code="invalid_value",
        )
    return value


def _logprobs(body: dict, kind: str) -> tuple[bool, int]:
    """(wanted, alternatives per token): chat's ``logprobs`` + ``top_logprobs``; completions' ``logprobs`` N."""
    value = body.get("logprobs")
    if kind == "completion":
        if value is None:
            return False, 0
        if not _is_int(value) or not 0 <= value <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}.", param="logprobs", code="invalid_value"
            )
        return True, value
    wanted = _bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return wanted, 0
    if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(
            f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}.",
            param="top_logprobs",
            code="invalid_value",
        )
    if top and not wanted:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true.", param="top_logprobs", code="invalid_value")
    return wanted, top


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """``logit_bias``: token id (a decimal string, as JSON keys are) -> -100..100; the worker checks the ids exist."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidRequest(
            "'logit_bias' must be an object mapping token ids to biases.", param="logit_bias", code="invalid_type"
        )
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"'logit_bias' has {len(value)} entries; the limit is {MAX_LOGIT_BIAS}.",
            param="logit_bias",
            code="invalid_value",
        )
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise InvalidRequest(
                f"'logit_bias' keys must be token ids (non-negative integers), got {key!r}.",
                param="logit_bias",
                code="invalid_value",
            )
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise InvalidRequest(
                f"'logit_bias[{key}]' must be a number from -100 to 100, got {bias!r}.",
                param="logit_bias",
                code="invalid_value",
            )
        pairs.append((int(key), float(bias)))
    return tuple(sorted(dict(pairs).items()))


def _sampling(body: dict, *, kind: str, default_max_tokens: int | None, max_n: int) -> SamplingParams:
    from tripod.tool_requests import parse_response_format, parse_tool_use

    top_k = body.get("top_k")
    if top_k is None:
        top_k = 0
    elif not _is_int(top_k) or top_k < -1:
        raise InvalidRequest(
            "'top_k' must be an integer >= -1 (0 or -1 disables it).", param="top_k", code="invalid_value"
        )
    logprobs, top_logprobs = _logprobs(body, kind)
    response_format = parse_response_format(body.get("response_format")) if kind == "chat" else None
    tools = parse_tool_use(body) if kind == "chat" else None
    if body.get("ignore_eos") and (response_format is not None or (tools is not None and tools.forced)):
        raise InvalidRequest(
            "'ignore_eos' cannot be combined with a grammar-enforced reply (response_format, or a forced tool_choice):"
            " the reply ends where the grammar does.",
            param="ignore_eos",
            code="invalid_value",
        )
    return SamplingParams(
        max_tokens=_max_tokens(body, default_max_tokens),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=max(top_k, 0),
        stop=_stop(body),
        seed=_seed(body),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        ignore_eos=_bool(body, "ignore_eos"),
        n=_n(body, max_n),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logit_bias=_logit_bias(body),
        response_format=response_format,
        tools=tools,
    )


def _reject_unsupported(body: dict, known: set[str]) -> None:
    """Refuse what we would otherwise silently ignore: the client would get something it did not ask for."""
    for name in ("echo",):
        if body.get(name) not in (None, False):
            raise InvalidRequest(f"'{name}' is not supported by this server.", param=name, code="unsupported_parameter")
    if body.get("suffix") is not None:
        raise InvalidRequest("'suffix' is not supported by this server.", param="suffix", code="unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise InvalidRequest("Only best_of=1 is supported.", param="best_of", code="unsupported_value")
    for name, instead in (("functions", "tools"), ("function_call", "tool_choice")):
        if body.get(name) is not None:
            raise InvalidRequest(
                f"'{name}' is OpenAI's deprecated form; use '{instead}'.", param=name, code="unsupported_parameter"
            )
    unknown = sorted(set(body) - known - _IGNORED_FIELDS)
    if unknown:
        raise InvalidRequest(
            f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0], code="unknown_parameter"
        )


_COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "stream",
    "stream_options",
    "logprobs",
    "logit_bias",
}
_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}


def _text_content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(
                    f"Content part of type '{kind}' is not supported; only text parts are.",
                    param=f"{param}[{j}]",
                    code="unsupported_value",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(
                    "A text content part needs a string 'text'.", param=f"{param}[{j}].text", code="invalid_type"
                )
            texts.append(text)
        return "".join(texts)
    raise InvalidRequest("'content' must be a string or a list of content parts.", param=param, code="invalid_type")


def _valid_tool_call(call: Any) -> bool:
    function = call.get("function") if isinstance(call, dict) else None
    return (
        isinstance(function, dict)
        and isinstance(function.get("name"), str)
        and isinstance(function.get("arguments", ""), str)
        and isinstance(call.get("id", ""), str)
    )


def parse_messages(value: Any, max_messages: int) -> list[dict[str, Any]]:
    """Validate OpenAI chat messages into the plain dicts chat templates expect."""
    if value is None:
        raise InvalidRequest("'messages' is required.", param="messages", code="missing_required_parameter")
    if not isinstance(value, list):
        raise InvalidRequest("'messages' must be a list of message objects.", param="messages", code="invalid_type")
    if not value:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages", code="invalid_value")
    if len(value) > max_messages:
        raise InvalidRequest(
            f"'messages' has {len(value)} messages; the limit is {max_messages}.",
            param="messages",
            code="too_many_messages",
        )
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where, code="invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequest(
                f"'{where}.role' must be one of {sorted(ROLES)}, got {role!r}.",
                param=f"{where}.role",
                code="invalid_value",
            )
        content = message.get("content")
        out: dict[str, Any] = {"role": "system" if role == "developer" else role}
        if content is None:
            if not (role == "assistant" and message.get("tool_calls")):
                raise InvalidRequest(
                    f"'{where}.content' is required.", param=f"{where}.content", code="missing_required_parameter"
                )
            out["content"] = ""
        else:
            out["content"] = _text_content(content, f"{where}.content")
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise InvalidRequest(f"'{where}.name' must be a string.", param=f"{where}.name", code="invalid_type")
            out["name"] = name
        if role == "tool":
            tool_call_id = message.get("tool_call_id")
            if not isinstance(tool_call_id, str):
                raise InvalidRequest(
                    f"'{where}.tool_call_id' is required for tool messages.",
                    param=f"{where}.tool_call_id",
                    code="missing_required_parameter",
                )
            out["tool_call_id"] = tool_call_id
        if role == "assistant" and message.get("tool_calls") is not None:
            tool_calls = message["tool_calls"]
            if not isinstance(tool_calls, list) or not all(_valid_tool_call(call) for call in tool_calls):
                raise InvalidRequest(
                    f"'{where}.tool_calls' must be a list of {{id, type, function: {{name, arguments}}}} objects.",
                    param=f"{where}.tool_calls",
                    code="invalid_type",
                )
            out["tool_calls"] = tool_calls
        messages.append(out)
    return messages


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options", code="invalid_value"
        )
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options", code="invalid_type")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidRequest(
            "'stream_options.include_usage' must be a boolean.",
            param="stream_options.include_usage",
            code="invalid_type",
        )
    return stream, include_usage


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string.", param="model", code="invalid_type")
    return model or None


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    return body


def parse_chat_request(body: Any, *, max_messages: int, max_n: int = DEFAULT_MAX_N) -> GenerationRequest:
    """Validate a ``POST /v1/chat/completions`` body (or a WebSocket ``chat`` frame)."""
    body = _require_object(body)
    _reject_unsupported(body, _CHAT_FIELDS)
    messages = parse_messages(body.get("messages"), max_messages)
    stream, include_usage = _stream_flags(body)
    return GenerationRequest(
        kind="chat",
        model=_model(body),
        params=_sampling(body, kind="chat", default_max_tokens=None, max_n=max_n),
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        user=body.get("user") if isinstance(body.get("user"), str) else None,
    )


# OpenAI's legacy completions endpoint defaults to 16 new tokens.
COMPLETION_DEFAULT_MAX_TOKENS = 16


def parse_completion_request(body: Any, *, max_n: int = DEFAULT_MAX_N) -> GenerationRequest:
    """Validate a ``POST /v1/completions`` body (or a WebSocket ``completion`` frame)."""
    body = _require_object(body)
    _reject_unsupported(body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise InvalidRequest("'prompt' is required.", param="prompt", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise InvalidRequest(
            "'prompt' must be a string (or a list holding one string).", param="prompt", code="invalid_type"
        )
    stream, include_usage = _stream_flags(body)
    return GenerationRequest(
        kind="completion",
        model=_model(body),
        params=_sampling(body, kind="completion", default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS, max_n=max_n),
        prompt=prompt,
        stream=stream,
        include_usage=include_usage,
        user=body.get("user") if isinstance(body.get("user"), str) else None,
    )
