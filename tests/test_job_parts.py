"""The job client and the worker, split along their seams: each part works on its own, and each fits a screen.

``GenerationJob`` (``consumers/jobs.py``) is the façade over admission, the event reader and settlement;
``Worker`` (``asgi_worker/loop.py``) ties pulling, serving, running and reporting together. The transports and the
process tests drive them whole; these check the parts without a model or a process.
"""

from __future__ import annotations

import ast
import asyncio
import time
from pathlib import Path

import pytest

from tripod import job_protocol as wire

ROOT = Path(__file__).resolve().parent.parent
PARTS = [
    "consumers/served_models.py",
    "consumers/job_admission.py",
    "consumers/job_queue.py",
    "consumers/job_events.py",
    "consumers/job_settlement.py",
    "asgi_worker/pull.py",
    "asgi_worker/serve.py",
    "asgi_worker/run.py",
    "asgi_worker/report.py",
]


def _class_lengths(path: str) -> dict[str, int]:
    tree = ast.parse((ROOT / path).read_text())
    return {node.name: node.end_lineno - node.lineno + 1 for node in tree.body if isinstance(node, ast.ClassDef)}


def test_the_facades_shed_their_parts_and_each_part_fits_a_screen():
    # Before the first split: GenerationJob 455 lines, Worker 380; before the second, 279 and 222.
    assert _class_lengths("consumers/jobs.py")["GenerationJob"] < 150
    assert _class_lengths("asgi_worker/loop.py")["Worker"] < 150
    for path in PARTS:
        for name, length in _class_lengths(path).items():
            assert length <= 100, (path, name, length)


async def test_the_reply_reader_decodes_events_and_times_out_with_none():
    from consumers.job_events import ReplyReader
    from tripod.patches.inmemory_layer import LocalChannelLayer

    reader = ReplyReader(LocalChannelLayer())
    channel = await reader.open()
    assert channel.startswith(wire.REPLY_CHANNEL_PREFIX)
    assert await reader.next_event(0.01) is None
    await reader.layer.send(channel, wire.encode(wire.Delta("j", "hi", 1, 0)))
    assert await reader.next_event(1) == wire.Delta("j", "hi", 1, 0)
    await reader.layer.send(channel, {"type": "generate.nonsense"})
    with pytest.raises(Exception) as raised:
        await reader.next_event(1)
    assert getattr(raised.value, "code", None) == "protocol_error"
    reader.close()


async def test_a_reader_on_a_layer_whose_receive_is_not_cancel_safe_keeps_one_receive_pending():
    from consumers.job_events import ReplyReader
    from tripod.patches.inmemory_layer import LocalChannelLayer

    class Layer(LocalChannelLayer):
        receive_is_cancel_safe = False

    reader = ReplyReader(Layer())
    channel = await reader.open()
    assert await reader.next_event(0.01) is None
    pending = reader._pending
    assert pending is not None and not pending.done()
    await reader.layer.send(channel, wire.encode(wire.Done("j", "stop", {"total_tokens": 3})))
    assert isinstance(await reader.next_event(1), wire.Done) and reader._pending is None
    assert await reader.next_event(0.01) is None
    reader.close()
    await asyncio.sleep(0)
    assert reader._pending is None


class _Stream:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_runs_remember_a_cancel_for_a_job_not_started_and_give_up_stops_a_running_one():
    from asgi_worker.run import Runs

    runs = Runs()
    runs.cancel("waiting")
    assert runs.was_cancelled("waiting") and not runs.was_cancelled("waiting")
    stream = _Stream()
    runs.running["job"] = stream
    runs.give_up("job")
    assert stream.cancelled and "job" in runs._given_up
    runs.end("job")
    runs.forget("job")
    assert not runs.running and not runs._given_up


class _Registry:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def claim(self, job_id: str, worker_id: str) -> bool:
        self.calls.append(("claim", job_id))
        return job_id != "taken"

    async def release(self, job_id: str, worker_id: str, deadline: float) -> None:
        self.calls.append(("release", job_id))


async def test_claims_hold_only_what_was_claimed_and_release_only_that():
    from asgi_worker.pull import Claims

    registry = _Registry()
    claims = Claims(registry, "worker-a")
    assert await claims.claim("mine") and not await claims.claim("taken")
    assert claims.held == {"mine"}
    await claims.release("taken", time.time())
    await claims.release("mine", time.time())
    assert registry.calls == [("claim", "mine"), ("claim", "taken"), ("release", "mine")] and not claims.held
