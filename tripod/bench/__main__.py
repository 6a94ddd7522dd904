"""``python -m tripod.bench``."""

from __future__ import annotations

import sys

from tripod.bench.cli import main

sys.exit(main())
