#!/usr/bin/env python
"""The seed's training entry point: ``python run_train.py --config path.yaml [key=value ...]``.

The same as ``python manage.py run_train``; see docs/training.md.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tripod.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(["run_train.py", "run_train", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
