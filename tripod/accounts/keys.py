"""API keys: who is calling, checked the same way on REST, SSE and WebSocket.

Keys are long random tokens, so a SHA-256 hash is enough to store them (no slow KDF needed: there is
nothing to brute-force). The single ``API_KEY`` environment variable of the seed still works, compared
in constant time. With no key configured at all the server is open, and says so at startup.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.db import DatabaseError
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission

from tripod.conf import config
from tripod.errors import APIError

logger = logging.getLogger(__name__)

KEY_PREFIX = "tpd_"


@dataclass(frozen=True)
class Principal:
    """The caller: an API key (``key_id``), the ``API_KEY`` setting, or anyone (open server)."""

    name: str
    key_id: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_streams: int | None = None

    @property
    def bucket(self) -> str:
        """The rate-limit and usage bucket this caller counts against."""
        return f"key{self.key_id}" if self.key_id is not None else self.name

    @property
    def limited(self) -> bool:
        return any(limit is not None for limit in (self.rpm, self.tpm, self.max_streams))


OPEN = Principal(name="anonymous")


class InvalidAPIKey(APIError):
    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")
        self.headers = {"WWW-Authenticate": 'Bearer realm="tripod"'}


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class _KeyCache:
    """A short-lived cache of lookups, so a busy server does not query the database per request.

    Revocation and new keys take effect within ``TRIPOD_AUTH_CACHE_SECONDS``.
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, Principal | None]] = {}
        self.keys_exist: tuple[float, bool] = (float("-inf"), False)

    def clear(self) -> None:
        self.entries.clear()
        self.keys_exist = (float("-inf"), False)


_cache = _KeyCache()


def forget_cached_keys() -> None:
    """Drop cached lookups (after keys change in this process)."""
    _cache.clear()


def _fresh(stamp: float) -> bool:
    return time.monotonic() - stamp < config().auth_cache_seconds


class _NeedsDatabase(Exception):
    """The caches cannot answer: the database must be asked."""


def _stored_keys_exist(cached_only: bool = False) -> bool:
    from tripod.models import APIKey

    stamp, exist = _cache.keys_exist
    if not _fresh(stamp):
        if cached_only:
            raise _NeedsDatabase
        try:
            exist = APIKey.objects.filter(revoked_at__isnull=True).exists()
        except DatabaseError:
            # An unmigrated or unreachable database must not open the server if a key is set;
            # with no API_KEY either, there is nothing to protect with.
            exist = False
        _cache.keys_exist = (time.monotonic(), exist)
    return exist


def auth_required(cached_only: bool = False) -> bool:
    """Whether any key is configured (the ``API_KEY`` setting or an active stored key)."""
    return bool(config().api_key) or _stored_keys_exist(cached_only)


def _lookup(key: str, cached_only: bool = False) -> Principal | None:
    from tripod.models import APIKey

    digest = hash_key(key)
    cached = _cache.entries.get(digest)
    if cached is not None and _fresh(cached[0]):
        return cached[1]
    if cached_only:
        raise _NeedsDatabase
    row = APIKey.objects.filter(hashed_key=digest, revoked_at__isnull=True).first()
    principal = None
    if row is not None:
        principal = Principal(name=row.name, key_id=row.pk, rpm=row.rpm, tpm=row.tpm, max_streams=row.max_streams)
    if len(_cache.entries) > 10_000:
        _cache.entries.clear()
    _cache.entries[digest] = (time.monotonic(), principal)
    return principal


def authenticate(token: str | None, *, cached_only: bool = False) -> Principal:
    """The caller for a bearer token; raises ``InvalidAPIKey`` (401) when keys are required and it fails.

    ``cached_only``: answer from the settings and the lookup cache, or raise ``_NeedsDatabase``.
    """
    cfg = config()
    if not auth_required(cached_only):
        return OPEN
    if not token:
        raise InvalidAPIKey(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' "
            "(on a WebSocket, the header or the subprotocols ['tripod', 'bearer.YOUR_KEY'])."
        )
    if cfg.api_key and hmac.compare_digest(token.encode(), cfg.api_key.encode()):
        return Principal(name="API_KEY", rpm=cfg.api_key_rpm, tpm=cfg.api_key_tpm, max_streams=cfg.api_key_max_streams)
    principal = _lookup(token, cached_only) if token.startswith(KEY_PREFIX) else None
    if principal is None:
        raise InvalidAPIKey("Incorrect API key provided.")
    return principal


async def authenticate_async(token: str | None) -> Principal:
    """``authenticate`` for the event loop: from the caches when they answer, else in a worker thread."""
    try:
        return authenticate(token, cached_only=True)
    except _NeedsDatabase:
        # In any free thread, with Django's connection rules kept there (closed after use by default).
        return await database_sync_to_async(authenticate, thread_sensitive=False)(token)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def websocket_token(headers: dict[bytes, bytes], subprotocols: list[str]) -> str | None:
    """A browser cannot set headers on a WebSocket, so the key may come as a ``bearer.<key>`` subprotocol."""
    token = bearer_token(headers.get(b"authorization", b"").decode("latin-1") or None)
    if token:
        return token
    for protocol in subprotocols:
        if protocol.startswith("bearer."):
            return protocol[len("bearer.") :]
    return None


def log_open_server() -> None:
    """Say loudly at startup when anyone can use the server."""
    try:
        required = auth_required()
    except Exception:  # noqa: BLE001 - a startup message must never stop the server
        logger.debug("could not check API keys at startup", exc_info=True)
        return
    if required:
        logger.info("API keys are required on every endpoint except /healthz and /readyz.")
    else:
        logger.warning(
            "No API key is configured: the server is OPEN to anyone who can reach it. "
            "Create one with `python manage.py tripod_keys create NAME` or set API_KEY."
        )


class BearerKeyAuthentication(BaseAuthentication):
    """DRF authentication: ``Authorization: Bearer <key>``; the user is a :class:`Principal`."""

    def authenticate(self, request) -> tuple[Principal, str | None]:
        token = bearer_token(request.META.get("HTTP_AUTHORIZATION"))
        return authenticate(token), token

    async def authenticate_async(self, request) -> tuple[Principal, str | None]:
        """For :class:`tripod.patches.drf_async_view.AsyncAPIView`: no thread unless the database must be asked."""
        token = bearer_token(request.META.get("HTTP_AUTHORIZATION"))
        return await authenticate_async(token), token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="tripod"'


class HasPrincipal(BasePermission):
    """Every API view needs a caller (an open server authenticates everyone as anonymous)."""

    def has_permission(self, request, view) -> bool:
        return isinstance(request.user, Principal)


def revoke(name_or_prefix: str) -> int:
    """Revoke keys by name or key prefix; returns how many."""
    from tripod.models import APIKey

    rows = APIKey.objects.filter(revoked_at__isnull=True)
    count = (rows.filter(name=name_or_prefix) | rows.filter(prefix=name_or_prefix)).update(revoked_at=timezone.now())
    forget_cached_keys()
    return count
