"""What ``/readyz`` checks: the database, the channel layer, and a model that can serve.

A load balancer or orchestrator sends traffic only where it answers 200. Embedded, the first check starts loading the
model, so a readiness probe also warms the server.
"""

from __future__ import annotations

import threading
from typing import Any

from asgiref.sync import async_to_sync
from django.db import connection

from tripod.conf import config
from tripod.registry import REGISTRY_ERRORS, get_registry

_loading: threading.Thread | None = None
_load_error: str | None = None


def _database() -> dict[str, Any]:
    try:
        connection.ensure_connection()
        return {"ok": True}
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return {"ok": False, "error": str(exc)}


def _inline_model() -> dict[str, Any]:
    """Embedded mode: ready once the model is loaded; asking starts the load."""
    global _loading
    from tripod.engines import loaded_chat_model

    model = loaded_chat_model()
    if model is not None and model.can_generate:
        return {"ok": True, "model": model.model_name, "engine": model.engine}
    if _load_error is not None:
        # Say why instead of "loading" forever; each probe tries again, so a fixed cause recovers.
        error, _loading = f"loading failed: {_load_error}", None
        _start_loading()
        return {"ok": False, "model": config().served_model_name, "error": error}
    if _loading is None or not _loading.is_alive():
        _start_loading()
    return {"ok": False, "model": config().served_model_name, "error": "loading"}


def _start_loading() -> None:
    global _loading

    def load() -> None:
        global _load_error
        from tripod.engines import get_chat_model

        try:
            get_chat_model()
            _load_error = None
        except Exception as exc:  # noqa: BLE001 - reported by /readyz
            _load_error = f"{type(exc).__name__}: {exc}"

    if _loading is None or not _loading.is_alive():
        _loading = threading.Thread(target=load, name="tripod-model-load", daemon=True)
        _loading.start()


async def _workers() -> dict[str, Any]:
    registry = get_registry()
    try:
        await registry.redis.ping()
    except REGISTRY_ERRORS as exc:
        return {"ok": False, "error": f"Redis unreachable: {exc}"}
    workers = await registry.workers()
    models = sorted({worker.model for worker in workers})
    return {
        "ok": bool(workers),
        "workers": len(workers),
        "models": models,
        **({} if workers else {"error": "no live worker; start `python -m asgi_worker`"}),
    }


def check() -> dict[str, dict[str, Any]]:
    checks = {"database": _database()}
    if config().inline_worker:
        checks["channel_layer"] = {"ok": True, "backend": "in-memory"}
        checks["model"] = _inline_model()
    else:
        workers = async_to_sync(_workers)()
        checks["channel_layer"] = {"ok": "Redis unreachable" not in workers.get("error", ""), "backend": "redis"}
        checks["workers"] = workers
    return checks
