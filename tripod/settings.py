"""Django settings for AI Tripod.

Every knob is an environment variable read here, once; the README lists them all with their
defaults. Tripod's own knobs land in ``TRIPOD`` and are read through :mod:`tripod.conf`.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


DEBUG = _env_bool("DJANGO_DEBUG", False)
# Only used to sign sessions for the admin; set it in production.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "tripod-insecure-development-key-change-me")
ALLOWED_HOSTS = [h.strip() for h in os.environ.get("TRIPOD_ALLOWED_HOSTS", "*").split(",") if h.strip()]

INSTALLED_APPS = [
    "daphne",  # first, so that `manage.py runserver` is daphne's ASGI runserver
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "tripod",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
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

# Embedded default: one process, in-memory channel layer, the worker inline.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels.layers.InMemoryChannelLayer",
        # Reply channels carry coalesced deltas; a generous capacity keeps a slow reader from
        # tripping ChannelFull before the worker notices it is gone.
        "CONFIG": {"capacity": 1000, "expiry": 120},
    }
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["tripod.api.parsers.OpenAIJSONParser"],
    "EXCEPTION_HANDLER": "tripod.errors.drf_exception_handler",
    "UNAUTHENTICATED_USER": None,
}

TRIPOD = {
    "MODEL": os.environ.get("TRIPOD_MODEL", "tiny"),
    "SERVED_MODEL_NAME": os.environ.get("TRIPOD_SERVED_MODEL_NAME", ""),
    "ENGINE": os.environ.get("TRIPOD_ENGINE", "hf"),
    "DEVICE": os.environ.get("TRIPOD_DEVICE", "auto"),
    "DTYPE": os.environ.get("TRIPOD_DTYPE", "auto"),
    "SLOTS": int(os.environ.get("TRIPOD_SLOTS", "0")),
    "CACHE_DIR": os.environ.get("TRIPOD_CACHE_DIR", str(Path.home() / ".cache" / "tripod")),
    "MAX_BODY_BYTES": TRIPOD_MAX_BODY_BYTES,
    "MAX_MESSAGES": int(os.environ.get("TRIPOD_MAX_MESSAGES", "1024")),
    "QUEUE_TIMEOUT": float(os.environ.get("TRIPOD_QUEUE_TIMEOUT", "60")),
    "EVENT_TIMEOUT": float(os.environ.get("TRIPOD_EVENT_TIMEOUT", "60")),
    "ENGINE_STEP_TIMEOUT": float(os.environ.get("TRIPOD_ENGINE_STEP_TIMEOUT", "60")),
    "SSE_KEEPALIVE": float(os.environ.get("TRIPOD_SSE_KEEPALIVE", "10")),
    "WS_MAX_INFLIGHT": int(os.environ.get("TRIPOD_WS_MAX_INFLIGHT", "8")),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("TRIPOD_LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}
