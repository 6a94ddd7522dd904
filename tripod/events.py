"""Message types of the web <-> worker protocol on the channel layer (see DESIGN.md).

Every message is a plain dict (msgpack-able for channels_redis); these names keep both sides honest.
"""

from __future__ import annotations

JOB = "generate.request"
STARTED = "generate.started"
DELTA = "generate.delta"
DONE = "generate.done"
ERROR = "generate.error"
CANCEL = "generate.cancel"
