"""``python -m tripod.bench``: the benchmark client as a command.

It only hands the command line to ``cli.main``, which tests call in-process, and exits with its status.
"""

from __future__ import annotations

import sys

from tripod.bench.cli import main

sys.exit(main())
