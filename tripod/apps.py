"""The ``tripod`` app's configuration.

Its ``ready`` reads Tripod's settings once, so that a bad ``TRIPOD_*`` value stops the process at start.
"""

from django.apps import AppConfig


class TripodConfig(AppConfig):
    name = "tripod"
    verbose_name = "AI Tripod"

    def ready(self) -> None:
        from tripod.conf import config

        config()  # a bad TRIPOD_* value stops the process at start, not each request with a 500
