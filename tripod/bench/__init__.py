"""The benchmark client: ``python -m tripod.bench`` loads a server (or the engine alone) and reports metrics.

``cli`` holds the flags and the JSON, ``load`` the concurrent clients, ``transports`` the SSE, WebSocket and
REST requests, ``direct`` the in-process engine run, ``prompts`` the prompts of a given token length,
``metrics`` the vLLM-named summary and ``machine`` where the numbers were measured.
"""

from __future__ import annotations

from tripod.bench.cli import main, run_benchmark

__all__ = ["main", "run_benchmark"]
