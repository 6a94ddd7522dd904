"""OpenAPI descriptions of the API's bodies (raw JSON Schema, as OpenAI publishes its own).

Bodies are validated by :mod:`tripod.protocol`, not by DRF serializers, so drf-spectacular has nothing to derive them
from; the views attach these with ``extend_schema``.
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiResponse

_NUMBER = {"type": "number"}
_STOP = {
    "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}],
    "nullable": True,
    "description": "Up to 4 sequences; the text stops before them and never contains them.",
}
_SAMPLING = {
    "model": {"type": "string", "description": "Defaults to the served model; another name is a 404."},
    "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "temperature": {**_NUMBER, "minimum": 0, "maximum": 2, "default": 1, "description": "0 is greedy."},
    "top_p": {**_NUMBER, "minimum": 0, "maximum": 1, "default": 1},
    "top_k": {"type": "integer", "minimum": -1, "description": "Extension; 0 or -1 disables it."},
    "stop": _STOP,
    "seed": {"type": "integer", "nullable": True, "description": "Same seed, same output."},
    "n": {"type": "integer", "minimum": 1, "default": 1, "description": "Choices; at most TRIPOD_MAX_N (8)."},
    "logit_bias": {
        "type": "object",
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        "nullable": True,
        "description": "Token id (as a string) -> bias added to its logit.",
    },
    "presence_penalty": {**_NUMBER, "minimum": -2, "maximum": 2, "default": 0},
    "frequency_penalty": {**_NUMBER, "minimum": -2, "maximum": 2, "default": 0},
    "ignore_eos": {"type": "boolean", "default": False, "description": "Extension: always generate max_tokens."},
    "stream": {"type": "boolean", "default": False, "description": "Answer with Server-Sent Events."},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
        "nullable": True,
        "description": "Only with stream: true.",
    },
    "user": {"type": "string"},
}
MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                    },
                },
            ]
        },
        "name": {"type": "string"},
        "tool_call_id": {"type": "string", "description": "Required for role tool."},
    },
}
_FUNCTION = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "description": {"type": "string"},
        "parameters": {"type": "object", "description": "A JSON Schema of the arguments."},
        "strict": {"type": "boolean"},
    },
}
TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {"type": {"type": "string", "enum": ["function"]}, "function": _FUNCTION},
}
CHAT_REQUEST = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "items": MESSAGE, "minItems": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        **_SAMPLING,
        "logprobs": {"type": "boolean", "default": False},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "nullable": True},
        "tools": {"type": "array", "items": TOOL, "maxItems": 128},
        "tool_choice": {
            "oneOf": [
                {"type": "string", "enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "required": ["type", "function"],
                    "properties": {
                        "type": {"type": "string", "enum": ["function"]},
                        "function": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}},
                        },
                    },
                },
            ],
            "description": "required and a named function are enforced by grammar.",
        },
        "parallel_tool_calls": {"type": "boolean", "default": True},
        "response_format": {
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
                "json_schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "schema": {"type": "object"},
                        "strict": {"type": "boolean"},
                    },
                },
            },
            "description": "json_object and json_schema replies are enforced by grammar-constrained decoding.",
        },
    },
}
COMPLETION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 1}]},
        **_SAMPLING,
        "max_tokens": {"type": "integer", "minimum": 1, "default": 16},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "nullable": True},
    },
}
USAGE = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}
_FINISH = {"type": "string", "enum": ["stop", "length", "tool_calls"], "nullable": True}
_COMMON = {"id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"}}
CHAT_COMPLETION = {
    "type": "object",
    "properties": {
        **_COMMON,
        "object": {"type": "string", "enum": ["chat.completion"]},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer"},
                    "message": {
                        "type": "object",
                        "properties": {
                            "role": {"type": "string"},
                            "content": {"type": "string", "nullable": True},
                            "tool_calls": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                    "logprobs": {"type": "object", "nullable": True},
                    "finish_reason": _FINISH,
                },
            },
        },
        "usage": USAGE,
    },
}
TEXT_COMPLETION = {
    "type": "object",
    "properties": {
        **_COMMON,
        "object": {"type": "string", "enum": ["text_completion"]},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": _FINISH},
            },
        },
        "usage": USAGE,
    },
}
EVENT_STREAM = {
    "type": "string",
    "description": (
        "Server-Sent Events: `data: <chat.completion.chunk JSON>` frames (the first delta carries the role), a "
        "chunk with finish_reason, a usage chunk when stream_options.include_usage is true, then `data: [DONE]`. "
        '`: keep-alive` comments while waiting. An error after the stream began arrives as `data: {"error": ...}`.'
    ),
}
STREAM = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["stream"]},
        "model": {"type": "string"},
        "created": {"type": "integer"},
        "url": {"type": "string", "description": "Signed URL to GET (EventSource) or DELETE; no key needed."},
        "expires_at": {"type": "integer", "description": "Unix time after which the URL stops working."},
    },
}
RESUMABLE_EVENT_STREAM = {
    "type": "string",
    "description": (
        "Server-Sent Events as for `stream: true`, each with `id: <n>` (1, 2, 3, ...) and a first `retry:` field. "
        "Reconnect with `Last-Event-ID: <n>` (or `?last_event_id=<n>`) to continue right after frame n."
    ),
}
ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
MODEL = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["model"]},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}
MODEL_LIST = {"type": "object", "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": MODEL}}}
USAGE_LIST = {
    "type": "object",
    "properties": {
        "object": {"type": "string"},
        "key": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "date": {"type": "string", "format": "date"},
                    "requests": {"type": "integer"},
                    **USAGE["properties"],
                },
            },
        },
    },
}
HEALTH = {"type": "object", "properties": {"status": {"type": "string"}}}
READY = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not_ready"]},
        "missing": {"type": "array", "items": {"type": "string"}},
        "checks": {"type": "object", "additionalProperties": True},
    },
}

ERROR_RESPONSES = {
    status: OpenApiResponse(ERROR, description=text)
    for status, text in (
        (400, "Invalid request; `param` names the field."),
        (401, "Missing, wrong or revoked API key."),
        (404, "Unknown model."),
        (403, "Bad, foreign or expired stream token."),
        (413, "Request body too large."),
        (429, "Rate limit reached; see Retry-After."),
        (500, "The engine failed."),
        (503, "No worker available, or the channel layer is down."),
    )
}


def generation_responses(body: dict) -> dict:
    return {
        (200, "application/json"): OpenApiResponse(body, description="The whole completion (stream: false)."),
        (200, "text/event-stream"): OpenApiResponse(EVENT_STREAM, description="The streamed completion."),
        **{(status, "application/json"): response for status, response in ERROR_RESPONSES.items()},
    }


def plain_responses(body: dict, *statuses: int) -> dict:
    return {200: OpenApiResponse(body), **{status: ERROR_RESPONSES[status] for status in statuses}}


class BearerKeyScheme(OpenApiAuthenticationExtension):
    """Documents :class:`tripod.accounts.keys.BearerKeyAuthentication` as HTTP bearer auth."""

    target_class = "tripod.accounts.keys.BearerKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An API key from `manage.py tripod_keys`."}
