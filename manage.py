#!/usr/bin/env python
"""Django's command-line utility for AI Tripod.

It names ``tripod.settings`` as the settings module, so ``runserver`` (daphne's) and Tripod's own commands need
nothing else configured.
"""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tripod.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
