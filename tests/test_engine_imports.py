"""Engines depend on the engine contract, not on Django: each one imports in a process without Django settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE_MODULES = sorted(
    f"tripod.engines.{path.stem}" for path in (ROOT / "tripod" / "engines").glob("*.py") if path.stem != "__init__"
)
# What engines import from the rest of the package.
SHARED_MODULES = ["tripod.engines", "tripod.errors", "tripod.protocol", "tripod.responses"]

IMPORT_ALL = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("django", "rest_framework", "channels"))
print(json.dumps(loaded))
"""


def test_the_engine_list_covers_the_engines_the_factory_knows():
    from tripod.engines.base import ENGINE_MODULES as REGISTERED

    assert set(REGISTERED.values()) <= set(ENGINE_MODULES)
    assert {"tripod.engines.hf_cb_sampling", "tripod.engines.hf_cb_internals"} <= set(ENGINE_MODULES)


def test_every_engine_module_imports_without_django():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    command = [sys.executable, "-c", IMPORT_ALL, *ENGINE_MODULES, *SHARED_MODULES]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", f"Django loaded by an engine: {result.stdout}"
