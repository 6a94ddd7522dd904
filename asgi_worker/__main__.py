"""``python -m asgi_worker``: a GPU worker process for the scaled deployment (``REDIS_URL`` set).

Start one per GPU, on any machine that reaches the Redis of the web processes:

    REDIS_URL=redis://10.0.0.5:6379/0 TRIPOD_MODEL=Qwen/Qwen2.5-0.5B-Instruct python -m asgi_worker --slots 8

SIGTERM stops taking jobs, finishes those in flight (at most ``--drain-timeout`` seconds), then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # The engine registry's names, so that a new engine shows here without an edit (imports no engine).
    from tripod.engines.base import ENGINE_MODULES

    parser = argparse.ArgumentParser(prog="python -m asgi_worker", description="AI Tripod GPU worker")
    parser.add_argument("--model", help="model to serve (default: $TRIPOD_MODEL, else 'tiny')")
    parser.add_argument("--served-model-name", help="name clients use (default: $TRIPOD_SERVED_MODEL_NAME)")
    parser.add_argument(
        "--engine",
        choices=sorted(ENGINE_MODULES),
        help=f"engine: {', '.join(sorted(ENGINE_MODULES))} (default: $TRIPOD_ENGINE, else 'hf')",
    )
    parser.add_argument("--slots", type=int, help="generations at once (default: $TRIPOD_SLOTS, else the engine's)")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=float(os.environ.get("TRIPOD_DRAIN_TIMEOUT", "30")),
        help="seconds to finish running jobs after SIGTERM (default: $TRIPOD_DRAIN_TIMEOUT, else 30)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("TRIPOD_METRICS_PORT", "0")),
        help="serve Prometheus metrics on this port (default: $TRIPOD_METRICS_PORT, else none)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Flags win over the environment; settings read the environment once, at setup.
    for flag, variable in (
        (args.model, "TRIPOD_MODEL"),
        (args.served_model_name, "TRIPOD_SERVED_MODEL_NAME"),
        (args.engine, "TRIPOD_ENGINE"),
        (args.slots, "TRIPOD_SLOTS"),
    ):
        if flag is not None:
            os.environ[variable] = str(flag)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tripod.settings")
    import django

    django.setup()

    from channels.layers import get_channel_layer

    from asgi_worker.loop import Worker
    from tripod.conf import config
    from tripod.registry import get_registry

    cfg = config()
    if not cfg.redis_url:
        print(
            "asgi_worker needs REDIS_URL: without it the web process runs its own inline worker.",
            file=sys.stderr,
        )
        return 2
    worker = Worker.from_settings(get_channel_layer(), registry=get_registry())

    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stop)
        await worker.run(drain_timeout=args.drain_timeout)

    asyncio.run(serve())
    logging.getLogger(__name__).info("worker %s exited", worker.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
