"""Tripod's settings, typed and read once.

Configuration comes from the environment through ``settings.TRIPOD``; for example::

    TRIPOD_MODEL=Qwen/Qwen2.5-0.5B-Instruct TRIPOD_ENGINE=hf TRIPOD_SLOTS=8 python manage.py runserver

Code reads ``config()``; tests that change ``settings.TRIPOD`` get a fresh object.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from tripod.job_protocol import job_channel

# TRIPOD_STREAM_INTERVAL=auto, as a job carries it: the worker picks the tokens per chunk by its load.
STREAM_INTERVAL_AUTO = "auto"


@dataclass(frozen=True)
class Config:
    """Every Tripod knob with its type; defaults live in ``tripod/settings.py``."""

    model: str
    adapter: str
    served_model_name: str
    engine: str
    device: str
    dtype: str
    slots: int
    cb_num_blocks: int
    cb_max_batch_tokens: int
    cb_cuda_graph: str
    cb_kv_padding: int
    cb_packed_gqa: bool
    cb_split_keys: int
    eager_writes: bool
    cache_dir: Path
    max_body_bytes: int
    http_header_timeout: float
    http_idle_timeout: float
    max_messages: int
    max_n: int
    tool_parser: str
    queue_timeout: float
    event_timeout: float
    engine_step_timeout: float
    sse_keepalive: float
    stream_interval: int | str  # tokens per streamed chunk after the first, or STREAM_INTERVAL_AUTO
    stream_ttl: float
    stream_reader_timeout: float
    ws_max_inflight: int
    ws_max_frame_bytes: int
    max_prompt_tokens: int
    max_tokens_cap: int
    api_key: str
    api_key_rpm: int | None
    api_key_tpm: int | None
    api_key_max_streams: int | None
    auth_cache_seconds: float
    log_content: bool
    redis_url: str
    heartbeat_interval: float
    worker_ttl: float
    no_worker_wait: float
    upstream_url: str
    upstream_api_key: str

    @property
    def inline_worker(self) -> bool:
        """Embedded mode: no Redis, so the worker runs inside the web process."""
        return not self.redis_url

    @property
    def job_channel(self) -> str:
        return job_channel(self.served_model_name)


def _optional_int(value) -> int | None:
    return int(value) if value not in (None, "") else None


def _stream_interval(value) -> int | str:
    """``TRIPOD_STREAM_INTERVAL``: ``auto`` (the worker picks by its load: ``auto_stream_interval``) or N >= 1."""
    if str(value).strip().lower() == STREAM_INTERVAL_AUTO:
        return STREAM_INTERVAL_AUTO
    try:
        return _at_least_one("TRIPOD_STREAM_INTERVAL", value)
    except ValueError:
        raise ImproperlyConfigured(f"TRIPOD_STREAM_INTERVAL must be 'auto' or 1 or more; it is {value!r}.") from None


def _tool_parser(value: str) -> str:
    """``TRIPOD_TOOL_PARSER``: empty (read from the chat template) or a format of ``tripod/engines/tool_calls.py``."""
    from tripod.engines.tool_calls import FORMATS

    if value and value not in FORMATS:
        raise ImproperlyConfigured(f"TRIPOD_TOOL_PARSER must be one of {', '.join(sorted(FORMATS))}; it is {value!r}.")
    return value


def _at_least_one(name: str, value) -> int:
    number = int(value)
    if number < 1:
        raise ImproperlyConfigured(f"{name} must be 1 or more; it is {number}.")
    return number


@cache
def config() -> Config:
    raw = settings.TRIPOD
    model = raw["MODEL"]
    return Config(
        model=model,
        adapter=raw.get("ADAPTER", ""),
        served_model_name=raw.get("SERVED_MODEL_NAME") or model,
        engine=raw["ENGINE"],
        device=raw["DEVICE"],
        dtype=raw["DTYPE"],
        slots=int(raw["SLOTS"]),
        cb_num_blocks=int(raw.get("CB_NUM_BLOCKS", 0)),
        cb_max_batch_tokens=int(raw.get("CB_MAX_BATCH_TOKENS", 0)),
        cb_cuda_graph=str(raw.get("CB_CUDA_GRAPH", "auto")),
        cb_kv_padding=int(raw.get("CB_KV_PADDING", 1024)),
        cb_packed_gqa=bool(raw.get("CB_PACKED_GQA", True)),
        cb_split_keys=int(raw.get("CB_SPLIT_KEYS", 0)),
        eager_writes=bool(raw.get("EAGER_WRITES", True)),
        cache_dir=Path(raw["CACHE_DIR"]).expanduser(),
        max_body_bytes=int(raw["MAX_BODY_BYTES"]),
        http_header_timeout=float(raw.get("HTTP_HEADER_TIMEOUT", 10)),
        http_idle_timeout=float(raw.get("HTTP_IDLE_TIMEOUT", 30)),
        max_messages=int(raw["MAX_MESSAGES"]),
        max_n=_at_least_one("TRIPOD_MAX_N", raw.get("MAX_N", 8)),
        tool_parser=_tool_parser(raw.get("TOOL_PARSER", "")),
        queue_timeout=float(raw["QUEUE_TIMEOUT"]),
        event_timeout=float(raw["EVENT_TIMEOUT"]),
        engine_step_timeout=float(raw["ENGINE_STEP_TIMEOUT"]),
        sse_keepalive=float(raw["SSE_KEEPALIVE"]),
        stream_interval=_stream_interval(raw.get("STREAM_INTERVAL", STREAM_INTERVAL_AUTO)),
        stream_ttl=float(raw.get("STREAM_TTL", 600)),
        stream_reader_timeout=float(raw.get("STREAM_READER_TIMEOUT", 30)),
        ws_max_inflight=int(raw["WS_MAX_INFLIGHT"]),
        ws_max_frame_bytes=int(raw.get("WS_MAX_FRAME_BYTES", 1 << 20)),
        max_prompt_tokens=int(raw.get("MAX_PROMPT_TOKENS", 0)),
        max_tokens_cap=int(raw.get("MAX_TOKENS_CAP", 0)),
        api_key=raw.get("API_KEY", ""),
        api_key_rpm=_optional_int(raw.get("API_KEY_RPM")),
        api_key_tpm=_optional_int(raw.get("API_KEY_TPM")),
        api_key_max_streams=_optional_int(raw.get("API_KEY_MAX_STREAMS")),
        auth_cache_seconds=float(raw.get("AUTH_CACHE_SECONDS", 5)),
        log_content=bool(raw.get("LOG_CONTENT", False)),
        redis_url=raw.get("REDIS_URL", ""),
        heartbeat_interval=float(raw.get("HEARTBEAT_INTERVAL", 1)),
        worker_ttl=float(raw.get("WORKER_TTL", 3)),
        no_worker_wait=float(raw.get("NO_WORKER_WAIT", 5)),
        upstream_url=raw.get("UPSTREAM_URL", ""),
        upstream_api_key=raw.get("UPSTREAM_API_KEY", ""),
    )


def _reset(*, setting: str, **kwargs) -> None:
    if setting == "TRIPOD":
        config.cache_clear()


setting_changed.connect(_reset)
