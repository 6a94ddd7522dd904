"""The job protocol between web processes and workers: typed messages, their wire format, and its version.

The round trips and strictness are unit tests of ``tripod/job_protocol.py``; the version checks drive a real worker
(the tiny model) on the embedded channel layer with jobs written as raw dicts, the way another version sends them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import msgpack
import pytest

from tripod import job_protocol as wire
from tripod.protocol import SamplingParams

PARAMS = SamplingParams(max_tokens=3, temperature=0.5, stop=("a", "b"), seed=4, top_k=5)
MESSAGES = [{"role": "user", "content": "Hello there"}]
# The keys a job carried before the protocol had a version: a worker of version 1 reads such a job.
UNVERSIONED_JOB_KEYS = {
    "type",
    "id",
    "request_id",
    "reply_channel",
    "model",
    "params",
    "max_prompt_tokens",
    "max_tokens_cap",
    "deadline",
    "stream_interval",
    "stream_hold",
    "messages",
    "web",
}


def job(**fields) -> wire.Job:
    return wire.Job(
        **{
            "id": "j1",
            "reply_channel": "tripod.reply.x",
            "model": "tiny",
            "params": PARAMS,
            "deadline": 1e10,
            "messages": MESSAGES,
            **fields,
        }
    )


@pytest.mark.parametrize(
    "message",
    [
        job(),
        job(messages=None, prompt="Once upon a time", web="web-1", stream_interval="auto", stream_hold=0.5),
        wire.Started("j1", "worker-1", "tripod.worker.x", prompt_tokens=7, max_tokens=20),
        wire.Started("j1", "worker-1", "tripod.worker.x", prompt_tokens=7),
        wire.Delta("j1", "text", tokens=2, seq=0),
        wire.Done("j1", "length", {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}),
        wire.Done("j1", None, None),
        wire.Error("j1", "no worker", 503, "no_worker_available", "model", "server_error"),
        wire.Cancel("j1"),
    ],
    ids=lambda message: type(message).__name__,
)
def test_every_message_survives_encode_msgpack_decode(message):
    data = msgpack.unpackb(msgpack.packb(wire.encode(message)))  # what channels_redis does to it
    assert wire.decode(data) == message


def test_the_wire_format_is_what_it_was_plus_the_version():
    assert (wire.Job.TYPE, wire.Started.TYPE, wire.Delta.TYPE, wire.Done.TYPE, wire.Error.TYPE, wire.Cancel.TYPE) == (
        "generate.request",
        "generate.started",
        "generate.delta",
        "generate.done",
        "generate.error",
        "generate.cancel",
    )
    data = wire.encode(job())
    assert set(data) == UNVERSIONED_JOB_KEYS | {"version"}
    assert data["version"] == wire.PROTOCOL_VERSION
    assert data["params"]["stop"] == ["a", "b"]
    assert set(wire.encode(wire.Started("j", "w", "c", 1, 2))) == {
        "type",
        "id",
        "worker",
        "control",
        "prompt_tokens",
        "max_tokens",
    }
    assert set(wire.encode(wire.Delta("j", "t", 1, 0))) == {"type", "id", "text", "tokens", "seq"}
    assert set(wire.encode(wire.Error("j", "m"))) == {"type", "id", "message", "status", "code", "param", "error_type"}
    assert wire.job_channel("org/Model name") == "tripod.generate.org-Model-name"


def test_a_job_without_a_version_is_version_1():
    data = wire.encode(job())
    del data["version"]
    assert wire.decode(data).version == 1


@pytest.mark.parametrize("key", ["id", "reply_channel", "model", "params", "deadline"])
def test_a_job_without_a_required_key_is_a_clear_error(key):
    data = wire.encode(job())
    del data[key]
    with pytest.raises(wire.ProtocolError, match=f"lacks its required key '{key}'") as raised:
        wire.decode(data)
    assert raised.value.code == "protocol_error"
    if key != "reply_channel":
        assert raised.value.reply_channel == "tripod.reply.x"  # where the worker answers


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"type": "generate.delta", "id": "j", "text": "a", "seq": 0}, "lacks its required key 'tokens'"),
        ({"type": "generate.started", "id": "j", "worker": "w", "prompt_tokens": 1}, "required key 'control'"),
        ({"type": "generate.elsewhere", "id": "j"}, "Unknown job protocol message type"),
        ({"id": "j"}, "Unknown job protocol message type"),
        (["generate.delta"], "must be a dict"),
    ],
)
def test_an_event_that_is_not_one_is_a_clear_error(message, match):
    with pytest.raises(wire.ProtocolError, match=match):
        wire.decode(message)


def test_a_job_must_carry_exactly_one_input_and_known_params():
    with pytest.raises(wire.ProtocolError, match="exactly one of 'messages' and 'prompt'"):
        wire.decode({**wire.encode(job()), "prompt": "and a prompt"})
    with pytest.raises(wire.ProtocolError, match="exactly one"):
        wire.decode(wire.encode(job(messages=None)))
    data = wire.encode(job())
    data["params"]["min_p"] = 0.1  # a sampling field from a newer web process must not be dropped silently
    with pytest.raises(wire.ProtocolError, match="does not know: min_p"):
        wire.decode(data)


def test_an_error_event_rebuilds_the_api_error():
    from tripod.errors import ServiceUnavailable

    sent = ServiceUnavailable("Redis is down", code="channel_layer_unavailable", param="model")
    error = wire.decode(wire.encode(wire.Error.from_error("j1", sent))).to_error()
    assert (error.status, error.type, error.code, error.param, error.message) == (
        503,
        "server_error",
        "channel_layer_unavailable",
        "model",
        "Redis is down",
    )


BEAT = wire.WorkerBeat("w1", "tiny", "hf", 4, 1, "tripod.worker.x", "host", 7, draining=False)


def test_a_heartbeat_record_survives_encode_json_decode_and_reads_without_a_type():
    record = json.loads(json.dumps({**wire.encode(BEAT), "last_beat": 1.0}))  # what the registry stores
    assert wire.decode(record, wire.WorkerBeat) == BEAT
    del record["type"]  # a worker of before the heartbeat had one
    assert wire.decode(record, wire.WorkerBeat) == BEAT
    with pytest.raises(wire.ProtocolError, match="Unknown job protocol message type"):
        wire.decode(record)  # never a channel layer message
    with pytest.raises(wire.ProtocolError, match="has the type 'generate.delta'"):
        wire.decode({**record, "type": "generate.delta"}, wire.WorkerBeat)
    del record["slots"]
    with pytest.raises(wire.ProtocolError, match="lacks its required key 'slots'"):
        wire.decode(record, wire.WorkerBeat)


def raw_job(reply: str, **fields) -> dict:
    """A job as a web process sends it, written out by hand: no help from the module under test."""
    params = {
        "max_tokens": 3,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "stop": [],
        "seed": None,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "ignore_eos": True,
    }
    return {
        "type": "generate.request",
        "id": uuid.uuid4().hex,
        "request_id": None,
        "reply_channel": reply,
        "model": "t",
        "params": params,
        "max_prompt_tokens": None,
        "max_tokens_cap": None,
        "deadline": time.time() + 60,
        "stream_interval": 1,
        "stream_hold": 0.0,
        "messages": MESSAGES,
        **fields,
    }


async def test_a_worker_answers_a_job_of_another_version_with_protocol_mismatch_then_serves_on(chat_model):
    """One slot: the refused job must free it, and the next job (unversioned, as today's web sends it) runs."""
    from asgi_worker.loop import Worker
    from tripod.patches.inmemory_layer import LocalChannelLayer

    layer = LocalChannelLayer()
    worker = Worker(layer, "tripod.generate.t", lambda: chat_model, 1)
    running = asyncio.create_task(worker.run())
    try:
        reply = await layer.new_channel("tripod.reply.")
        await layer.send("tripod.generate.t", raw_job(reply, version=wire.PROTOCOL_VERSION + 1))
        event = await asyncio.wait_for(layer.receive(reply), 30)
        assert event["type"] == "generate.error"
        assert (event["status"], event["code"], event["error_type"]) == (503, "protocol_mismatch", "server_error")
        assert f"version {wire.PROTOCOL_VERSION + 1}" in event["message"] and "version 1, 2" in event["message"], event[
            "message"
        ]

        await layer.send("tripod.generate.t", raw_job(reply))
        kinds = []
        while not kinds or kinds[-1] not in ("generate.done", "generate.error"):
            kinds.append((await asyncio.wait_for(layer.receive(reply), 30))["type"])
        assert kinds[0] == "generate.started" and kinds[-1] == "generate.done" and "generate.delta" in kinds, kinds
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)


async def test_a_worker_answers_a_job_it_cannot_read_instead_of_failing_on_a_missing_key():
    from asgi_worker.loop import Worker
    from asgi_worker.serve import serve
    from tripod.patches.inmemory_layer import LocalChannelLayer

    layer = LocalChannelLayer()
    worker = Worker(layer, "tripod.generate.t", lambda: None, 1)
    reply = await layer.new_channel("tripod.reply.")
    message = raw_job(reply)
    del message["params"]
    await serve(worker, message)
    event = await asyncio.wait_for(layer.receive(reply), 5)
    assert (event["type"], event["status"], event["code"]) == ("generate.error", 500, "protocol_error"), event
    assert "'params'" in event["message"]
