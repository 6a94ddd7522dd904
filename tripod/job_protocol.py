"""The job protocol: every message that crosses the channel layer between web processes and workers.

Scaled, web and worker processes are deployed separately, so what they exchange is a versioned contract kept here
and nowhere else: the channel names, one frozen dataclass per message and one for the workers' heartbeat record,
and the only ``encode`` (to a msgpack-able dict) and ``decode`` (strict: a missing required key raises
``ProtocolError``). docs/architecture.md ("The job protocol") says how the version moves in a rolling upgrade.
This module imports nothing of Django: the settings read its channel names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from tripod.engines.base import Delta as EngineDelta
    from tripod.errors import APIError
    from tripod.protocol import SamplingParams

# The version a job is sent in; a worker serves the jobs of SERVED_VERSIONS and answers the others with a
# ``protocol_mismatch`` error. A job without "version" comes from a web process older than the number: version 1.
PROTOCOL_VERSION = 2
SERVED_VERSIONS = frozenset({1, 2})
UNVERSIONED = 1

# Workers of a model pull jobs from JOB_CHANNEL_PREFIX + its slug; each job names its reply channel, each worker
# its control channel (in its ``Started`` event and its heartbeat); every control channel is in WORKERS_GROUP, which
# hears the cancels of jobs not admitted yet.
JOB_CHANNEL_PREFIX = "tripod.generate."
REPLY_CHANNEL_PREFIX = "tripod.reply."
CONTROL_CHANNEL_PREFIX = "tripod.worker."
WORKERS_GROUP = "tripod.workers"
# Channel layer names: letters, digits, "-_." and under 100 characters, prefix included.
_MODEL_SLUG_LENGTH = 80


def job_channel(model_name: str) -> str:
    """The channel that workers of ``model_name`` pull jobs from."""
    return JOB_CHANNEL_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "-", model_name)[:_MODEL_SLUG_LENGTH]


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``job_id`` and ``reply_channel`` say where to answer, if known."""

    code = "protocol_error"
    status = 500

    def __init__(self, message: str, *, job_id: str = "", reply_channel: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.reply_channel = reply_channel

    def to_event(self) -> Error:
        """The error event that tells the sender of the bad job what went wrong."""
        return Error(id=self.job_id, message=str(self), status=self.status, code=self.code, error_type="server_error")


class UnsupportedVersion(ProtocolError):
    """A job of a version this worker cannot serve (a rolling upgrade in the wrong order): 503, another may."""

    code = "protocol_mismatch"
    status = 503


@dataclass(frozen=True)
class Job:
    """A generation for a worker of ``model``: web -> the model's job channel. Exactly one of messages and prompt."""

    TYPE: ClassVar[str] = "generate.request"

    id: str
    reply_channel: str
    model: str
    params: SamplingParams
    deadline: float  # wall time after which nobody waits for this job any more
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    request_id: str | None = None
    max_prompt_tokens: int | None = None
    max_tokens_cap: int | None = None
    web: str | None = None  # scaled: the web process that reads it, whose heartbeat the worker watches
    stream_interval: int | str = 1  # tokens per delta after the first, or "auto" (tripod.conf.STREAM_INTERVAL_AUTO)
    stream_hold: float = 0.0  # the longest a delta may be held back to gather them
    version: int = PROTOCOL_VERSION

    @property
    def input(self) -> list[dict[str, Any]] | str:
        """What the engine starts from: the chat messages, or the raw prompt."""
        return self.messages if self.messages is not None else self.prompt or ""


@dataclass(frozen=True)
class Started:
    """The worker admitted the job: worker -> reply channel, first. Cancels go to ``control`` from now on."""

    TYPE: ClassVar[str] = "generate.started"

    id: str
    worker: str
    control: str
    prompt_tokens: int
    max_tokens: int | None = None  # the job's token budget, now that the worker has counted the prompt


@dataclass(frozen=True)
class Delta:
    """New text and the tokens it took; ``seq`` counts the deltas of a job from 0."""

    TYPE: ClassVar[str] = "generate.delta"

    id: str
    text: str
    tokens: int
    seq: int
    index: int = 0  # the choice (n > 1) this delta belongs to
    # Streamed tool calls: [{"index", "id"?, "name"?, "arguments"}] pieces, as ToolCallDelta encodes them.
    tool_calls: list[dict[str, Any]] | None = None
    # One entry per token: {"token", "bytes", "logprob", "top": [[token, bytes, logprob], ...]}.
    logprobs: list[dict[str, Any]] | None = None

    @classmethod
    def from_engine(cls, job_id: str, seq: int, delta: EngineDelta) -> Delta:
        """The message for an engine's delta (``tripod.engines.base.Delta``)."""
        if not (delta.tool_calls or delta.logprobs):  # a plain delta: every streamed token takes this path
            return cls(job_id, delta.text, delta.tokens, seq, delta.index)
        tool_calls = [dataclasses.asdict(call) for call in delta.tool_calls] or None
        logprobs = [
            {"token": lp.token, "bytes": list(lp.bytes), "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
            for lp in delta.logprobs
        ] or None
        return cls(job_id, delta.text, delta.tokens, seq, delta.index, tool_calls, logprobs)

    def to_engine(self) -> EngineDelta:
        """The engine delta this message carries; a malformed field is a ``ProtocolError``."""
        Delta, TokenLogprob, ToolCallDelta = _engine_types()
        if self.tool_calls is None and self.logprobs is None:  # a plain delta: every streamed token takes this path
            return Delta(self.text, int(self.tokens), (), (), int(self.index))
        try:
            calls = tuple(ToolCallDelta(**call) for call in self.tool_calls or ())
            logprobs = tuple(
                TokenLogprob(
                    lp["token"],
                    tuple(lp["bytes"]),
                    float(lp["logprob"]),
                    tuple((token, tuple(raw), float(value)) for token, raw, value in lp.get("top") or ()),
                )
                for lp in self.logprobs or ()
            )
            return Delta(self.text, int(self.tokens), logprobs, calls, int(self.index))
        except (TypeError, ValueError, KeyError) as exc:
            raise ProtocolError(f"A delta of job {self.id} holds a malformed field: {exc}", job_id=self.id) from None


@dataclass(frozen=True)
class Done:
    """The job ended; ``finish_reason`` None means cancelled. ``usage`` is exact, in OpenAI's shape."""

    TYPE: ClassVar[str] = "generate.done"

    id: str
    finish_reason: str | None
    usage: dict[str, int] | None
    finish_reasons: list[str | None] | None = None  # one per choice when n > 1; finish_reason is the first


@dataclass(frozen=True)
class Error:
    """The job failed, as an OpenAI error; the same in every version, so a mismatch can always be told."""

    TYPE: ClassVar[str] = "generate.error"

    id: str
    message: str
    status: int = 500
    code: str | None = None
    param: str | None = None
    error_type: str | None = None

    @classmethod
    def from_error(cls, job_id: str, error: APIError) -> Error:
        return cls(job_id, error.message, error.status, error.code, error.param, error.type)

    def to_error(self) -> APIError:
        """The ``APIError`` the worker raised, for the web side to answer with."""
        from tripod.errors import APIError  # imports Django; the worker side never calls this

        kind = self.error_type or ("server_error" if self.status >= 500 else None)
        return APIError(self.message, param=self.param, code=self.code, status=self.status, type=kind)


@dataclass(frozen=True)
class Cancel:
    """Stop job ``id``: web -> its worker's control channel, or WORKERS_GROUP before it was admitted."""

    TYPE: ClassVar[str] = "generate.cancel"

    id: str


@dataclass(frozen=True)
class WorkerBeat:
    """What a worker's heartbeat says of it (scaled: a JSON record in the registry, read by every web process).

    Not a channel layer message, but the same contract: web processes route by ``model``, count ``slots`` of the
    workers not ``draining``, and send cancels to ``control``. Its registry key says what it is, so a record
    without ``type`` (written by a worker of before the record had one) reads the same: ``decode(record, WorkerBeat)``.
    """

    TYPE: ClassVar[str] = "worker.beat"

    id: str
    model: str
    engine: str
    slots: int
    busy: int
    control: str | None
    host: str
    pid: int
    draining: bool


@cache
def _engine_types() -> tuple[type, type, type]:
    """The engine's delta types, imported once on first use: the settings import this module, not the engines."""
    from tripod.engines.base import Delta, TokenLogprob, ToolCallDelta

    return Delta, TokenLogprob, ToolCallDelta


Message = Job | Started | Delta | Done | Error | Cancel
# What encode writes and decode reads: the channel layer's messages, and the heartbeat record.
Record = Message | WorkerBeat
_TYPES: dict[str, type[Message]] = {kind.TYPE: kind for kind in (Job, Started, Delta, Done, Error, Cancel)}
# Each record's keys and whether each is required, worked out once: a stream encodes and decodes every delta.
_KEYS: dict[type[Record], tuple[tuple[str, bool], ...]] = {
    kind: tuple((field.name, field.default is dataclasses.MISSING) for field in dataclasses.fields(kind))
    for kind in (*_TYPES.values(), WorkerBeat)
}


# Records whose optional fields are left out at their defaults (0, None): a stream sends one per delta.
_SPARSE = (Delta, Done)


def encode(message: Record) -> dict[str, Any]:
    """``message`` as the dict the channel layer (or the registry) carries: msgpack-able, no tuples or dataclasses."""
    data: dict[str, Any] = {"type": message.TYPE}
    sparse = type(message) in _SPARSE
    for name, required in _KEYS[type(message)]:
        value = getattr(message, name)
        if sparse and not required and not value:  # a plain delta stays as small as it was in version 1
            continue
        data[name] = value
    if isinstance(message, Job):
        data["params"] = _encode_params(message.params)
        data.pop("messages" if message.messages is None else "prompt")
    return data


def decode(data: Mapping[str, Any], kind: type[Record] | None = None) -> Record:
    """The typed message of a dict from the channel layer; raises ``ProtocolError`` when it is not one.

    Keys it does not know are ignored (a peer may add an optional one without a new version); a missing required
    key, a wrong ``type`` or a job of a version not in SERVED_VERSIONS is an error. ``kind`` is for a record whose
    carrier says what it is (a heartbeat under its registry key): its ``type``, if any, must be that one.
    """
    if not isinstance(data, Mapping):
        raise ProtocolError(f"A job protocol message must be a dict, not {type(data).__name__}.")
    name = data.get("type")
    if kind is None:
        kind = _TYPES.get(name) if isinstance(name, str) else None
        if kind is None:
            raise ProtocolError(f"Unknown job protocol message type {name!r}.", **_where(data))
    elif name not in (None, kind.TYPE):
        raise ProtocolError(f"A '{kind.TYPE}' record has the type {name!r}.", **_where(data))
    if kind is Job:
        return _decode_job(data)
    return kind(**_fields(kind, data))


def _where(data: Mapping[str, Any]) -> dict[str, Any]:
    """Where to answer a bad job, as far as it says."""
    reply = data.get("reply_channel")
    return {"job_id": str(data.get("id") or ""), "reply_channel": reply if isinstance(reply, str) and reply else None}


def _fields(kind: type[Record], data: Mapping[str, Any]) -> dict[str, Any]:
    values = {}
    for name, required in _KEYS[kind]:
        if name in data:
            values[name] = data[name]
        elif required:
            raise ProtocolError(f"A '{kind.TYPE}' message lacks its required key '{name}'.", **_where(data))
    return values


def _decode_job(data: Mapping[str, Any]) -> Job:
    version = data.get("version", UNVERSIONED)
    if not isinstance(version, int) or version not in SERVED_VERSIONS:
        served = ", ".join(str(v) for v in sorted(SERVED_VERSIONS))
        raise UnsupportedVersion(
            f"The job is job protocol version {version}; this worker serves version {served}. Upgrade the workers "
            "before the web processes (docs/architecture.md, 'The job protocol').",
            **_where(data),
        )
    values = {**_fields(Job, data), "version": version}
    if (values.get("messages") is None) == (values.get("prompt") is None):
        raise ProtocolError("A job must carry exactly one of 'messages' and 'prompt'.", **_where(data))
    values["params"] = _decode_params(values["params"], _where(data))
    return Job(**values)


def _encode_params(params: SamplingParams) -> dict[str, Any]:
    data = dataclasses.asdict(params)  # nested dataclasses (response_format, tools) become dicts too
    data["stop"] = list(params.stop)
    data["logit_bias"] = [list(pair) for pair in params.logit_bias]
    if params.tools is not None:
        data["tools"]["tools"] = [dataclasses.asdict(tool) for tool in params.tools.tools]
    return data


def _decode_nested(data: Mapping[str, Any], where: dict[str, Any]) -> dict[str, Any]:
    """The nested fields of ``params`` as their dataclasses; a malformed one is a ``ProtocolError``."""
    from tripod.protocol import ResponseFormat, Tool, ToolUse

    values: dict[str, Any] = {}
    try:
        values["logit_bias"] = tuple((int(token), float(bias)) for token, bias in data.get("logit_bias") or ())
        if data.get("response_format") is not None:
            values["response_format"] = ResponseFormat(**data["response_format"])
        if data.get("tools") is not None:
            tools = dict(data["tools"])
            tools["tools"] = tuple(Tool(**tool) for tool in tools.get("tools") or ())
            values["tools"] = ToolUse(**tools)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"A job's 'params' holds a malformed field: {exc}", **where) from None
    return values


def _decode_params(data: Any, where: dict[str, Any]) -> SamplingParams:
    """A sampling field this side does not know is an error, never dropped; one it lacks takes its default."""
    from tripod.protocol import SamplingParams  # its module imports Django; the settings import this one

    if not isinstance(data, Mapping):
        raise ProtocolError("A job's 'params' must be a dict.", **where)
    known = {field.name for field in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProtocolError(f"A job's 'params' holds fields this side does not know: {', '.join(unknown)}.", **where)
    stop = data.get("stop") or ()
    if not isinstance(stop, (list, tuple)) or not all(isinstance(text, str) for text in stop):
        raise ProtocolError("A job's 'params.stop' must be a list of strings.", **where)
    return SamplingParams(**{**data, "stop": tuple(stop), **_decode_nested(data, where)})
