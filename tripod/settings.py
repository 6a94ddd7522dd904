"""Django settings for AI Tripod.

Every knob is an environment variable read here, once; the README lists them all with their
defaults. Tripod's own knobs land in ``TRIPOD`` and are read through :mod:`tripod.conf`.
"""

from __future__ import annotations

import os
from pathlib import Path

from corsheaders.defaults import default_headers as cors_default_headers
from django.core.exceptions import ImproperlyConfigured

from tripod.deploy_checks import INSECURE_SECRET_KEY

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


DEBUG = _env_bool("DJANGO_DEBUG", False)
# Signs the admin's sessions and the resumable-stream URLs. The built-in key is refused at startup unless
# DJANGO_DEBUG=1 or the embedded server listens on loopback only (tripod/deploy_checks.py).
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or INSECURE_SECRET_KEY
ALLOWED_HOSTS = [h.strip() for h in os.environ.get("TRIPOD_ALLOWED_HOSTS", "*").split(",") if h.strip()]

# Behind a TLS-terminating proxy: the origins the admin's forms are posted from (https://tripod.example.com),
# and the header the proxy sets on HTTPS requests, "HTTP_X_FORWARDED_PROTO,https". Without either, Django
# takes a proxied HTTPS request for plain HTTP and its CSRF check refuses the admin login (403).
CSRF_TRUSTED_ORIGINS = _env_list("TRIPOD_CSRF_TRUSTED_ORIGINS")
if os.environ.get("TRIPOD_SECURE_PROXY_SSL_HEADER"):
    _header = _env_list("TRIPOD_SECURE_PROXY_SSL_HEADER")
    if len(_header) != 2 or not _header[0].startswith("HTTP_"):
        raise ImproperlyConfigured(
            "TRIPOD_SECURE_PROXY_SSL_HEADER must be HEADER,VALUE with the header as Django names it, "
            f"e.g. HTTP_X_FORWARDED_PROTO,https; got {os.environ['TRIPOD_SECURE_PROXY_SSL_HEADER']!r}"
        )
    SECURE_PROXY_SSL_HEADER = (_header[0], _header[1])
# No page of this server is meant to be framed: the admin least of all (clickjacking).
X_FRAME_OPTIONS = "DENY"
# Admin login: this many failed attempts from one address, or for one username, within this many seconds of
# the first, lock that address or username out until then (429); 0 attempts: no limit. Counted in the cache.
TRIPOD_ADMIN_LOGIN_ATTEMPTS = int(os.environ.get("TRIPOD_ADMIN_LOGIN_ATTEMPTS", "5"))
TRIPOD_ADMIN_LOGIN_WINDOW = int(os.environ.get("TRIPOD_ADMIN_LOGIN_WINDOW", "300"))
if TRIPOD_ADMIN_LOGIN_WINDOW < 1:
    raise ImproperlyConfigured(f"TRIPOD_ADMIN_LOGIN_WINDOW must be at least 1 second; got {TRIPOD_ADMIN_LOGIN_WINDOW}")

# CORS (django-cors-headers), for browser apps on other origins calling the API with a bearer key: a list of
# origins, or "*" for any. Never with credentials: the API takes keys, not cookies, so "*" exposes no session.
# Preflights are answered before authentication; SSE and resumable streams get the same headers.
_cors_origins = _env_list("TRIPOD_CORS_ORIGINS")
CORS_ALLOW_ALL_ORIGINS = _cors_origins == ["*"]
CORS_ALLOWED_ORIGINS = [] if CORS_ALLOW_ALL_ORIGINS else _cors_origins
CORS_URLS_REGEX = r"^/(v1|api)/"
CORS_ALLOW_HEADERS = [*cors_default_headers, "last-event-id", "x-request-id"]
CORS_EXPOSE_HEADERS = ["retry-after", "x-request-id"]
CORS_ALLOW_CREDENTIALS = False

INSTALLED_APPS = [
    "daphne",  # first, so that `manage.py runserver` is daphne's ASGI runserver
    "tripod.accounts.admin_site.TripodAdminConfig",  # django.contrib.admin with a login that counts failures
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served by /docs/ui/ (tripod/api/docs.py): no CDN
    "corsheaders",
    "tripod",
    "tripod.training",
]

MIDDLEWARE = [
    "tripod.observability.logs.RequestIDMiddleware",
    "corsheaders.middleware.CorsMiddleware",  # before anything that may answer: preflights need no key
    # Django's own, run on the event loop instead of a thread per hook (see tripod/patches/middleware.py).
    "tripod.patches.middleware.SecurityMiddleware",
    "tripod.patches.middleware.SessionMiddleware",
    "tripod.patches.middleware.CommonMiddleware",
    "tripod.patches.middleware.CsrfViewMiddleware",
    "tripod.patches.middleware.AuthenticationMiddleware",
    "tripod.patches.middleware.MessageMiddleware",
    "tripod.patches.middleware.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "tripod.urls"
ASGI_APPLICATION = "tripod.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    # Keys, usage and training runs shared by every web process: e.g. postgres://user:pass@db:5432/tripod.
    import dj_database_url

    # conn_max_age 0: under ASGI, Django's docs advise against persistent connections (each thread holds one).
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("TRIPOD_DB_PATH", str(BASE_DIR / "db.sqlite3")),
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"

# Request bodies: the API parses JSON itself and answers 413 above this size.
TRIPOD_MAX_BODY_BYTES = int(os.environ.get("TRIPOD_MAX_BODY_BYTES", str(4 * 1024 * 1024)))
DATA_UPLOAD_MAX_MEMORY_SIZE = TRIPOD_MAX_BODY_BYTES

QUEUE_TIMEOUT = float(os.environ.get("TRIPOD_QUEUE_TIMEOUT", "60"))
REDIS_URL = os.environ.get("REDIS_URL", "")

if REDIS_URL:
    # Scaled: any number of web processes and `python -m asgi_worker` processes share one Redis.
    from tripod.patches.redis_connections import redis_channel_layer  # here: redis-py is slow to import

    CHANNEL_LAYERS = {"default": redis_channel_layer(REDIS_URL, QUEUE_TIMEOUT)}
else:
    # Embedded default: one process, in-memory channel layer, the worker inline.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "tripod.patches.inmemory_layer.LocalChannelLayer",  # channels' in-memory layer, lighter
            # The inline worker joins the workers group once: keep it there for as long as the process lives.
            "CONFIG": {"capacity": 1000, "expiry": int(QUEUE_TIMEOUT) + 60, "group_expiry": 10 * 365 * 86400},
        }
    }

if REDIS_URL:
    # Django's cache holds the admin login counters (tripod/accounts/admin_site.py): in Redis, every web process counts
    # the same failures. Without it, the default in-process cache serves the one process.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "tripod.cache",
        }
    }

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["tripod.accounts.keys.BearerKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["tripod.accounts.keys.HasPrincipal"],
    "DEFAULT_RENDERER_CLASSES": ["tripod.api.renderers.OpenAIJSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["tripod.api.parsers.OpenAIJSONParser"],
    "EXCEPTION_HANDLER": "tripod.api.errors.drf_exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

TRIPOD = {
    "MODEL": os.environ.get("TRIPOD_MODEL", "tiny"),
    "ADAPTER": os.environ.get("TRIPOD_ADAPTER", ""),
    "SERVED_MODEL_NAME": os.environ.get("TRIPOD_SERVED_MODEL_NAME", ""),
    "ENGINE": os.environ.get("TRIPOD_ENGINE", "hf"),
    "DEVICE": os.environ.get("TRIPOD_DEVICE", "auto"),
    "DTYPE": os.environ.get("TRIPOD_DTYPE", "auto"),
    "SLOTS": int(os.environ.get("TRIPOD_SLOTS", "0")),
    # hf-cb: KV cache size and tokens per step; 0 means auto on GPU, 512 blocks / 256 tokens on CPU.
    "CB_NUM_BLOCKS": int(os.environ.get("TRIPOD_CB_NUM_BLOCKS", "0")),
    "CB_MAX_BATCH_TOKENS": int(os.environ.get("TRIPOD_CB_MAX_BATCH_TOKENS", "0")),
    "CB_CUDA_GRAPH": os.environ.get("TRIPOD_CB_CUDA_GRAPH", "auto"),
    # hf-cb with CUDA graphs: KV tokens a step reads, padded up to a multiple of this; 0: transformers' 16384.
    "CB_KV_PADDING": int(os.environ.get("TRIPOD_CB_KV_PADDING", "1024")),
    # hf-cb on CUDA without flash attention: masked attention on grouped heads without copying keys and values.
    "CB_PACKED_GQA": os.environ.get("TRIPOD_CB_PACKED_GQA", "1") == "1",
    "CB_SPLIT_KEYS": int(os.environ.get("TRIPOD_CB_SPLIT_KEYS", "0")),
    # daphne sends a response chunk at once when nothing is queued ahead of it (tripod/patches/eager_writes.py).
    "EAGER_WRITES": os.environ.get("TRIPOD_EAGER_WRITES", "1") != "0",
    "CACHE_DIR": os.environ.get("TRIPOD_CACHE_DIR", str(Path.home() / ".cache" / "tripod")),
    "MAX_BODY_BYTES": TRIPOD_MAX_BODY_BYTES,
    # daphne's connections (tripod/patches/http_limits.py): a request's head must arrive within this, and a client
    # receiving nothing back may stay silent this long; neither applies while a response streams.
    "HTTP_HEADER_TIMEOUT": float(os.environ.get("TRIPOD_HTTP_HEADER_TIMEOUT", "10")),
    "HTTP_IDLE_TIMEOUT": float(os.environ.get("TRIPOD_HTTP_IDLE_TIMEOUT", "30")),
    "MAX_MESSAGES": int(os.environ.get("TRIPOD_MAX_MESSAGES", "1024")),
    # The most choices (`n`) one request may ask for.
    "MAX_N": int(os.environ.get("TRIPOD_MAX_N", "8")),
    # How tool calls are read out of the model's text: hermes, llama3 or mistral; empty: told by the chat template.
    "TOOL_PARSER": os.environ.get("TRIPOD_TOOL_PARSER", ""),
    "QUEUE_TIMEOUT": QUEUE_TIMEOUT,
    "REDIS_URL": REDIS_URL,
    "HEARTBEAT_INTERVAL": float(os.environ.get("TRIPOD_HEARTBEAT_INTERVAL", "1")),
    "WORKER_TTL": float(os.environ.get("TRIPOD_WORKER_TTL", "3")),
    "NO_WORKER_WAIT": float(os.environ.get("TRIPOD_NO_WORKER_WAIT", "5")),
    "UPSTREAM_URL": os.environ.get("TRIPOD_UPSTREAM_URL", ""),
    "UPSTREAM_API_KEY": os.environ.get("TRIPOD_UPSTREAM_API_KEY", ""),
    "EVENT_TIMEOUT": float(os.environ.get("TRIPOD_EVENT_TIMEOUT", "60")),
    "ENGINE_STEP_TIMEOUT": float(os.environ.get("TRIPOD_ENGINE_STEP_TIMEOUT", "60")),
    "SSE_KEEPALIVE": float(os.environ.get("TRIPOD_SSE_KEEPALIVE", "10")),
    "STREAM_INTERVAL": os.environ.get("TRIPOD_STREAM_INTERVAL", "auto"),
    "STREAM_TTL": float(os.environ.get("TRIPOD_STREAM_TTL", "600")),
    "STREAM_READER_TIMEOUT": float(os.environ.get("TRIPOD_STREAM_READER_TIMEOUT", "30")),
    "WS_MAX_INFLIGHT": int(os.environ.get("TRIPOD_WS_MAX_INFLIGHT", "8")),
    "WS_MAX_FRAME_BYTES": int(os.environ.get("TRIPOD_WS_MAX_FRAME_BYTES", str(1024 * 1024))),
    "MAX_PROMPT_TOKENS": int(os.environ.get("TRIPOD_MAX_PROMPT_TOKENS", "0")),
    "MAX_TOKENS_CAP": int(os.environ.get("TRIPOD_MAX_TOKENS_CAP", "0")),
    # The seed's single key; stored keys come from `manage.py tripod_keys`.
    "API_KEY": os.environ.get("API_KEY", ""),
    "API_KEY_RPM": os.environ.get("TRIPOD_API_KEY_RPM", ""),
    "API_KEY_TPM": os.environ.get("TRIPOD_API_KEY_TPM", ""),
    "API_KEY_MAX_STREAMS": os.environ.get("TRIPOD_API_KEY_MAX_STREAMS", ""),
    "LOG_CONTENT": os.environ.get("TRIPOD_LOG_CONTENT", "") in {"1", "true", "yes"},
    "AUTH_CACHE_SECONDS": float(os.environ.get("TRIPOD_AUTH_CACHE_SECONDS", "5")),
}

# JSON lines by default (one object per line, with the request id); TRIPOD_LOG_FORMAT=text for people.
SPECTACULAR_SETTINGS = {
    "TITLE": "AI Tripod API",
    "DESCRIPTION": (
        "OpenAI-compatible REST API of AI Tripod. Streaming (`stream: true`) answers with Server-Sent Events "
        "(docs/sse.md); the WebSocket protocol at /ws/chat/ is described in docs/websocket.md."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from this server (tripod/api/docs.py), so /docs works offline and loads nothing from a CDN.
    "SWAGGER_UI_DIST": "/docs/ui",
    "SWAGGER_UI_FAVICON_HREF": "/docs/ui/favicon-32x32.png",
    "COMPONENT_SPLIT_REQUEST": True,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "tripod.observability.logs.RequestIDFilter"}},
    "formatters": {
        "json": {"()": "tripod.observability.logs.JsonFormatter"},
        "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": os.environ.get("TRIPOD_LOG_FORMAT", "json"),
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": os.environ.get("TRIPOD_LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}
