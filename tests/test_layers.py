"""The embedded mode's channel layer keeps channels' in-memory semantics with less work per message."""

from __future__ import annotations

import asyncio

import pytest
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer

from tripod.patches.inmemory_layer import LocalChannelLayer


def test_the_embedded_mode_uses_it():
    assert isinstance(get_channel_layer(), LocalChannelLayer)


async def test_messages_arrive_in_order_as_copies():
    layer = LocalChannelLayer()
    sent = {"type": "generate.delta", "text": "a", "meta": {"n": 1}}
    flat = {"type": "generate.done", "seq": 1}
    await layer.send("tripod.reply.x", sent)
    await layer.send("tripod.reply.x", flat)
    sent["meta"]["n"] = 2  # the sender reusing its dicts changes nothing the receiver holds
    flat["seq"] = 2
    assert await layer.receive("tripod.reply.x") == {"type": "generate.delta", "text": "a", "meta": {"n": 1}}
    assert await layer.receive("tripod.reply.x") == {"type": "generate.done", "seq": 1}


async def test_the_expiry_sweep_runs_at_most_once_per_interval(monkeypatch):
    layer = LocalChannelLayer()
    sweeps = []
    clean = layer._clean_expired
    monkeypatch.setattr(layer, "_clean_expired", lambda: sweeps.append(1) or clean())
    for i in range(100):
        await layer.send("tripod.reply.x", {"type": "t", "i": i})
        assert (await layer.receive("tripod.reply.x"))["i"] == i
    assert len(sweeps) == 1


async def test_expired_messages_and_idle_queues_are_swept_but_a_waiting_receiver_keeps_its_queue():
    layer = LocalChannelLayer(expiry=0.05)
    layer.sweep_interval = 0  # sweep on every receive
    await layer.send("tripod.reply.old", {"type": "stale"})
    waiting = asyncio.ensure_future(layer.receive("tripod.reply.waiting"))
    await asyncio.sleep(0.1)
    await layer.send("tripod.reply.used", {"type": "t"})
    await layer.receive("tripod.reply.used")  # sweeps: "old" expired, "used" is empty and idle
    assert "tripod.reply.old" not in layer.channels
    assert "tripod.reply.waiting" in layer.channels
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("tripod.reply.old"), 0.1)
    await layer.send("tripod.reply.waiting", {"type": "late"})
    assert (await asyncio.wait_for(waiting, 1))["type"] == "late"


async def test_capacity_and_groups_work_as_in_channels():
    layer = LocalChannelLayer(capacity=2)
    await layer.send("tripod.reply.x", {"type": "t"})
    await layer.send("tripod.reply.x", {"type": "t"})
    with pytest.raises(ChannelFull):
        await layer.send("tripod.reply.x", {"type": "t"})
    await layer.group_add("tripod.workers", "tripod.control.a")
    await layer.group_send("tripod.workers", {"type": "cancel"})
    assert await layer.receive("tripod.control.a") == {"type": "cancel"}


async def test_a_receive_cancelled_after_its_message_arrived_leaves_the_message_for_the_next():
    """What lets a reader await ``receive`` under a timeout (``receive_is_cancel_safe``)."""
    layer = LocalChannelLayer()
    assert layer.receive_is_cancel_safe
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await layer.receive("reply.a")
    receiving = asyncio.create_task(layer.receive("reply.a"))
    await asyncio.sleep(0)  # the receive now waits on the queue
    await layer.send("reply.a", {"type": "delta", "n": 1})
    receiving.cancel()  # woken, but cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await receiving
    assert await layer.receive("reply.a") == {"type": "delta", "n": 1}


async def test_invalid_channel_names_are_refused_on_send_and_receive():
    layer = LocalChannelLayer()
    with pytest.raises(TypeError):
        await layer.send("no spaces allowed", {"type": "x"})
    with pytest.raises(TypeError):
        await layer.receive("no spaces allowed")
