"""The models a request can name, and the one each request goes to.

Embedded, that is the configured model; scaled, the models that live workers serve (their heartbeats in the
registry), with a short wait for a worker of a model that had one. ``GET /v1/models`` lists them, and the job
client resolves each request's model here before it takes a rate-limit lease.
"""

from __future__ import annotations

import asyncio
import time

from consumers.job_queue import layer_down
from tripod.conf import config
from tripod.errors import ModelNotFound, ServiceUnavailable
from tripod.registry import REGISTRY_ERRORS, get_registry


async def served_models() -> list[str]:
    """Models a request can name: the configured one, or (scaled) those with a live worker."""
    registry = get_registry()
    if registry is None:
        return [config().served_model_name]
    try:
        return sorted(await registry.live_models())
    except REGISTRY_ERRORS as exc:
        raise layer_down(exc) from None


async def resolve_model(requested: str | None) -> str:
    """The model a request asks for (no ``model`` means the configured default).

    Scaled, a model that has had workers but has none alive right now gets ``no_worker_wait`` seconds
    for one to appear, then a 503; a model no worker ever served is a 404.
    """
    cfg = config()
    name = requested or cfg.served_model_name
    registry = get_registry()
    if registry is None:
        if name != cfg.served_model_name:
            raise ModelNotFound(name)
        return name
    try:
        deadline = time.monotonic() + cfg.no_worker_wait
        while True:
            if name in await registry.live_models():
                return name
            if name not in await registry.known_models() and name != cfg.served_model_name:
                raise ModelNotFound(name)
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(
                    f"No live worker serves the model '{name}'; start one with `python -m asgi_worker --model ...`.",
                    param="model",
                    code="no_worker_available",
                )
            await asyncio.sleep(0.25)
    except REGISTRY_ERRORS as exc:
        raise layer_down(exc) from None
