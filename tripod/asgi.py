"""ASGI entry point: ``daphne tripod.asgi:application``.

It wraps :mod:`routing`'s application in the request body limit, refuses an insecure secret key, and installs the
patches on daphne (eager writes, HTTP limits) before daphne builds its HTTP factory.
"""

from __future__ import annotations

import os

# The project root (where routing.py sits) is on sys.path already: daphne adds its working directory, as do
# `python -m` and manage.py, so run it from the repository root.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tripod.settings")

from routing import application as routed  # noqa: E402
from tripod.conf import config  # noqa: E402
from tripod.deploy_checks import check_secret_key  # noqa: E402
from tripod.patches import http_limits  # noqa: E402

check_secret_key()  # the built-in DJANGO_SECRET_KEY only where nobody else can reach the server

if config().eager_writes:
    from tripod.patches.eager_writes import install

    install()

# Body, header and timeout limits on daphne's connections, before daphne builds its HTTP factory.
http_limits.install()
application = http_limits.RequestBodyLimit(routed)

__all__ = ["application"]
