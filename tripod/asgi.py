"""ASGI entry point: ``daphne tripod.asgi:application``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tripod.settings")
# routing.py sits at the project root, next to manage.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing import application as routed  # noqa: E402
from tripod import http_limits  # noqa: E402
from tripod.conf import config  # noqa: E402
from tripod.deploy_checks import check_secret_key  # noqa: E402

check_secret_key()  # the built-in DJANGO_SECRET_KEY only where nobody else can reach the server

if config().eager_writes:
    from tripod.eager_writes import install

    install()

# Body, header and timeout limits on daphne's connections, before daphne builds its HTTP factory.
http_limits.install()
application = http_limits.RequestBodyLimit(routed)

__all__ = ["application"]
