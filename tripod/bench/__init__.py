"""Benchmarks: a client that loads a server (or the engine alone) and reports vLLM's metrics, and the tools around it.

``python -m tripod.bench`` is the client: ``cli`` holds the flags and the JSON, ``load`` the concurrent clients,
``transports`` the SSE, WebSocket and REST requests, ``direct`` the in-process engine run, ``prompts`` the prompts of
a given token length, ``metrics`` the vLLM-named summary and ``machine`` where the numbers were measured. ``plot``
draws throughput against concurrency from its JSON, ``gpu_checks`` makes the checks only a GPU can, ``scripts/`` holds
the shell drivers (the CPU comparison, interleaved A/B runs, the GPU run and its wheels) and ``llama-3.2-1b.json`` is
the config of the GPU run's random-weight model. How to run them, and what they measured, is in docs/BENCHMARKS.md.
"""
