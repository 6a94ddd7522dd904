"""Tool calls in a model's own text: the formats of the popular open models, a streaming parser and a grammar.

A model calls a tool by writing markup its chat template taught it; each ``ToolCallFormat`` knows one such markup:
how to find it in the text (``ToolCallParser``) and how to force it (``call_grammar``, a llguidance Lark grammar)
when ``tool_choice`` requires a call. The markup follows what the models' chat templates ask for and what vLLM's
``hermes``, ``llama3_json`` and ``mistral`` tool parsers accept.

The parser reads the text one character at a time, so what it makes of a text never depends on how the text
was cut into ``feed`` calls (vLLM's parsers go wrong when one delta carries several tokens): it holds back only
what could still turn out to be markup, and lets it go as content as soon as it cannot.
"""

from __future__ import annotations

import json
import secrets
import string
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

from tripod.engines.base import ToolCallDelta
from tripod.protocol import ToolUse

_ID_ALPHABET = string.ascii_letters + string.digits
_NAME_CHARS = frozenset(_ID_ALPHABET + "_-.")


def new_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# A pattern is a tuple of pieces, matched left to right: a literal string, WS (any whitespace, maybe none) or
# NAME (a function name's characters, at least one). Every literal starts with a character that neither WS nor
# NAME takes, so a pattern matches deterministically, one character at a time.
WS = object()
NAME = object()
Pattern = tuple[object, ...]


def _call_object(arguments_key: str) -> Pattern:
    """``{"name": "<NAME>", "<arguments_key>": {``: the head of a call, up to its arguments object's brace."""
    return ("{", WS, '"name"', WS, ":", WS, '"', NAME, '"', WS, ",", WS, f'"{arguments_key}"', WS, ":", WS, "{")


class _Cursor:
    """Where one pattern's match stands; ``step`` says "more", "done" or "fail" for each next character."""

    __slots__ = ("pattern", "tag", "piece", "offset", "name")

    def __init__(self, pattern: Pattern, tag: str) -> None:
        self.pattern, self.tag = pattern, tag
        self.piece = self.offset = 0
        self.name = ""

    def step(self, c: str) -> str:
        while self.piece < len(self.pattern):
            piece = self.pattern[self.piece]
            if piece is WS:
                if c.isspace():
                    return "more"
                self.piece += 1
            elif piece is NAME:
                if c in _NAME_CHARS and len(self.name) < 64:
                    self.name += c
                    return "more"
                if not self.name:
                    return "fail"
                self.piece += 1
            else:
                if piece[self.offset] != c:
                    return "fail"
                self.offset += 1
                if self.offset == len(piece):
                    self.piece, self.offset = self.piece + 1, 0
                    return "done" if self.piece == len(self.pattern) else "more"
                return "more"
        return "fail"


class _Match:
    """Several patterns matched side by side; the first to match whole wins."""

    def __init__(self, patterns: tuple[tuple[Pattern, str], ...]) -> None:
        self.cursors = [_Cursor(pattern, tag) for pattern, tag in patterns]

    def step(self, c: str) -> _Cursor | str:
        alive = []
        for cursor in self.cursors:
            result = cursor.step(c)
            if result == "done":
                return cursor
            if result == "more":
                alive.append(cursor)
        self.cursors = alive
        return "more" if alive else "fail"


class ToolCallFormat:
    """One model family's tool-call markup. Subclasses fill in the class attributes."""

    name: ClassVar[str]
    # Texts that open a run of calls anywhere in the reply.
    openers: ClassVar[tuple[str, ...]]
    # Whether a bare ``{`` at the start of the reply opens a call too (Llama 3 writes no marker).
    bare_json: ClassVar[bool] = False
    # What may follow each opener, up to the first call's arguments object; tagged "call".
    after_opener: ClassVar[dict[str, tuple[tuple[Pattern, str], ...]]]
    # What may follow a call's closing brace: "call" (another call's head) or "end" (the run of calls is over).
    # No match ends the run too: what follows is content again.
    after_call: ClassVar[tuple[tuple[Pattern, str], ...]]
    # The grammar's text around the calls: the run's start, one call's head and tail, between calls, the run's end.
    arguments_key: ClassVar[str] = "arguments"
    grammar_open: ClassVar[str] = ""
    grammar_call_open: ClassVar[str] = ""
    grammar_call_close: ClassVar[str] = ""
    grammar_separator: ClassVar[str]
    grammar_close: ClassVar[str] = ""
    # The markup's marker texts, which a model's vocabulary may hold as single added tokens.
    markers: ClassVar[tuple[str, ...]] = ()

    def call_text(self, name: str, arguments: str) -> str:
        """One call as the grammar writes it, compact: for tests and for prompts that show the model a call."""
        return self._head(name) + arguments + self._tail()

    def _head(self, name: str) -> str:
        return f'{self.grammar_call_open}{{"name":{json.dumps(name)},"{self.arguments_key}":'

    def _tail(self) -> str:
        return "}" + self.grammar_call_close

    def call_grammar(self, tool_use: ToolUse, tokenizer=None) -> str:
        """A llguidance Lark grammar whose language is exactly the call block(s) ``tool_use`` forces.

        "function": one call of that function; "required": one call of any offered tool, or one or more when
        ``tool_use.parallel``. The JSON is compact (no free whitespace), so a forced reply always closes.
        Pass the model's ``tokenizer``: llguidance takes every added token for a special one, never for its text,
        so a marker that is an added token (Qwen's ``<tool_call>``) must be named as that token, or the model
        could only spell it out piece by piece.
        """
        tools = [t for t in tool_use.tools if tool_use.choice != "function" or t.name == tool_use.function]
        if not tools:
            raise ValueError(f"tool_choice names {tool_use.function!r}, which is not among the tools offered.")
        added = tokenizer.get_added_vocab() if tokenizer is not None else {}
        tokens = {marker: added[marker] for marker in self.markers if marker in added}

        def lark(text: str) -> str:
            return _lark(text, tokens)

        several = tool_use.choice == "required" and tool_use.parallel
        calls = f"call ({lark(self.grammar_separator)} call)*" if several else "call"
        start = " ".join(part for part in (lark(self.grammar_open), calls, lark(self.grammar_close)) if part)
        lines = [f"start: {start}", "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, tool in enumerate(tools):
            lines.append(f"call_{i}: {lark(self._head(tool.name))} args_{i} {lark(self._tail())}")
            lines.append(f"args_{i}: %json {_compact_schema(tool.parameters)}")
        return "\n".join(lines) + "\n"


def _lark(text: str, tokens: dict[str, int]) -> str:
    """``text`` as Lark: string literals, and ``<[id]>`` for each marker in ``tokens`` ("" for no text)."""
    parts, rest = [], text
    while rest:
        at, marker = min(((rest.find(m), m) for m in tokens if m in rest), default=(len(rest), ""))
        if at:
            parts.append(json.dumps(rest[:at]))
        if marker:
            parts.append(f"<[{tokens[marker]}]>")
        rest = rest[at + len(marker) :]
    return " ".join(parts)


def _compact_schema(parameters: str) -> str:
    """The tool's parameters schema, as an object, with llguidance told to write compact JSON."""
    schema = json.loads(parameters)
    if not isinstance(schema, dict):
        schema = {}
    schema.setdefault("type", "object")
    schema["x-guidance"] = {
        **schema.get("x-guidance", {}),
        "whitespace_flexible": False,
        "item_separator": ",",
        "key_separator": ":",
    }
    return json.dumps(schema, ensure_ascii=False)


class HermesFormat(ToolCallFormat):
    """Hermes 2 Pro, Qwen 2.5 and Qwen 3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
    one block per call."""

    name = "hermes"
    openers = ("<tool_call>",)
    after_opener = {"<tool_call>": (((WS, *_call_object("arguments")), "call"),)}
    after_call = (((WS, "</tool_call>"), "end"),)
    grammar_call_open = "<tool_call>\n"
    grammar_call_close = "\n</tool_call>"
    grammar_separator = "\n"
    markers = ("<tool_call>", "</tool_call>")


class Llama3Format(ToolCallFormat):
    """Llama 3.1-3.3 JSON tool calls: the reply is ``{"name": ..., "parameters": {...}}``, maybe after
    ``<|python_tag|>``; several are separated by ``;``. "arguments" is taken for "parameters" as vLLM does."""

    name = "llama3"
    openers = ("<|python_tag|>",)
    bare_json = True
    _heads = ((_call_object("parameters"), "call"), (_call_object("arguments"), "call"))
    after_opener = {
        "<|python_tag|>": tuple(((WS, *head), tag) for head, tag in _heads),
        "{": tuple((head[1:], tag) for head, tag in _heads),  # the bare brace is the head's first character
    }
    after_call = tuple(((WS, ";", WS, *head), tag) for head, tag in _heads)
    arguments_key = "parameters"
    grammar_separator = ";"


class MistralFormat(ToolCallFormat):
    """Mistral 7B Instruct v0.3 and its kin: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""

    name = "mistral"
    openers = ("[TOOL_CALLS]",)
    after_opener = {"[TOOL_CALLS]": (((WS, "[", WS, *_call_object("arguments")), "call"),)}
    after_call = (((WS, ",", WS, *_call_object("arguments")), "call"), ((WS, "]"), "end"))
    grammar_open = "[TOOL_CALLS]["
    grammar_separator = ","
    grammar_close = "]"
    markers = ("[TOOL_CALLS]",)


HERMES = HermesFormat()
LLAMA3 = Llama3Format()
MISTRAL = MistralFormat()
FORMATS = {fmt.name: fmt for fmt in (HERMES, LLAMA3, MISTRAL)}


def detect_format(chat_template: str | None, override: str | None = None) -> ToolCallFormat | None:
    """The tool-call format a model writes: ``override`` (TRIPOD_TOOL_PARSER) if given, else read from markers in
    its chat template; None when the template shows no tool support."""
    if override:
        try:
            return FORMATS[override]
        except KeyError:
            raise ValueError(
                f"Unknown tool-call format {override!r}; the valid ones are: {', '.join(sorted(FORMATS))}."
            ) from None
    template = chat_template or ""
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return None


def tool_call_format(tokenizer, override: str | None = None) -> ToolCallFormat | None:
    """``detect_format`` on a Hugging Face tokenizer's chat template."""
    template = getattr(tokenizer, "chat_template", None)
    return detect_format(template if isinstance(template, str) else None, override)


_CONTENT, _HEAD, _ARGUMENTS, _CLOSE, _AFTER = "content", "head", "arguments", "close", "after"


@dataclass
class _Call:
    index: int
    depth: int = 1  # the arguments object's nesting; its opening brace is already read
    in_string: bool = False
    escaped: bool = False


class ToolCallParser:
    """Splits a streamed reply into content and tool calls, the same way whatever the chunks.

    Arguments stream as the model writes them, byte for byte: no re-serializing means no waiting for a value to
    end, and what the client gets is the model's own text, as OpenAI sends it. A forced call is compact and valid
    by its grammar; an unforced one may be invalid JSON, as OpenAI warns its own may be.

    A call counts from the moment its head (``{"name": "f", "arguments": {``) is read and names an offered tool;
    until then a block that turns out not to be a call, malformed or cut short at ``flush``, goes out as content.
    A call cut short inside its arguments keeps what it has (the reply ran out, as with max_tokens); its
    unfinished closing markup at ``flush`` is dropped. Whitespace just before a call, or after the last one when
    nothing follows, is markup and dropped too.
    """

    def __init__(self, fmt: ToolCallFormat, tool_use: ToolUse) -> None:
        self.fmt = fmt
        self._names = frozenset(tool.name for tool in tool_use.tools)
        self._state = _CONTENT
        self._queue: deque[str] = deque()
        self._space = ""  # content whitespace held: dropped if a call follows
        self._marker = ""  # content that may be the start of an opener
        self._opener = ""  # what opened the block being read
        self._held = ""  # markup read after it but not yet accepted: it goes out as content if it fails
        self._match: _Match | None = None
        self._call: _Call | None = None
        self._started = False  # content or a call came before (a bare ``{`` opens calls only at the start)
        self._after_call = False  # the last thing was a call: whitespace held now goes if nothing else comes
        self._calls = 0
        self._content: list[str] = []
        self._pieces: list[ToolCallDelta] = []
        self._arguments: list[str] = []

    @property
    def called(self) -> bool:
        return self._calls > 0

    def feed(self, text: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """Read more of the reply; returns the content that is settled and the tool-call pieces read."""
        self._queue.extend(text)
        self._run()
        return self._take()

    def flush(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """The reply is over: settle what was held back."""
        while self._state != _CONTENT or self._space or self._marker:
            if self._state == _HEAD:
                self._fail_head("")
            elif self._state in (_ARGUMENTS, _CLOSE, _AFTER):
                self._held, self._state, self._after_call = "", _CONTENT, True
            else:
                if self._marker or not self._after_call:
                    self._emit(self._space + self._marker)
                self._space = self._marker = ""
            self._run()
        return self._take()

    def _take(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        self._end_arguments()
        content, pieces = "".join(self._content), tuple(self._pieces)
        self._content, self._pieces = [], []
        return content, pieces

    def _run(self) -> None:
        step = {
            _CONTENT: self._step_content,
            _HEAD: self._step_head,
            _ARGUMENTS: self._step_arguments,
            _CLOSE: self._step_after,
            _AFTER: self._step_after,
        }
        while self._queue:
            c = self._queue.popleft()
            step[self._state](c)

    def _replay(self, text: str) -> None:
        self._queue.extendleft(reversed(text))

    def _emit(self, text: str) -> None:
        if text:
            self._content.append(text)
            if not text.isspace():
                self._started, self._after_call = True, False

    def _step_content(self, c: str) -> None:
        if self._marker:
            candidate = self._marker + c
            if candidate in self.fmt.openers:
                self._open(candidate)
            elif any(opener.startswith(candidate) for opener in self.fmt.openers):
                self._marker = candidate
            else:  # not an opener after all; one may still start further on
                self._emit(self._space + candidate[0])
                self._space = self._marker = ""
                self._replay(candidate[1:])
        elif c.isspace():
            self._space += c
        elif c == "{" and self.fmt.bare_json and not self._started:
            self._open(c)
        elif any(opener.startswith(c) for opener in self.fmt.openers):
            self._marker = c
        else:
            self._emit(self._space + c)
            self._space = ""

    def _open(self, opener: str) -> None:
        self._state, self._opener, self._held, self._marker = _HEAD, opener, "", ""
        self._match = _Match(self.fmt.after_opener[opener])

    def _step_head(self, c: str) -> None:
        result = self._match.step(c)
        if result == "more":
            self._held += c
        elif result == "fail" or result.name not in self._names:
            self._fail_head(c)
        else:
            self._start_call(result.name)

    def _fail_head(self, c: str) -> None:
        """Not a call: the opener is content, and what came after it is read again as content."""
        self._state = _CONTENT
        self._emit(self._space + self._opener)
        self._replay(self._held + c)
        self._space = self._opener = self._held = ""

    def _start_call(self, name: str) -> None:
        self._end_arguments()
        self._space, self._held, self._state = "", "", _ARGUMENTS
        self._call = _Call(self._calls)
        self._calls += 1
        self._started = True
        self._pieces.append(ToolCallDelta(index=self._call.index, id=new_call_id(), name=name))
        self._arguments.append("{")

    def _end_arguments(self) -> None:
        if self._arguments:
            self._pieces.append(ToolCallDelta(index=self._call.index, arguments="".join(self._arguments)))
            self._arguments = []

    def _step_arguments(self, c: str) -> None:
        call = self._call
        self._arguments.append(c)
        if call.in_string:
            if call.escaped:
                call.escaped = False
            elif c == "\\":
                call.escaped = True
            elif c == '"':
                call.in_string = False
        elif c == '"':
            call.in_string = True
        elif c in "{[":
            call.depth += 1
        elif c in "}]":
            call.depth -= 1
            if call.depth == 0:
                self._state, self._held = _CLOSE, ""
                self._match = _Match((((WS, "}"), "close"),))

    def _step_after(self, c: str) -> None:
        """After a call's arguments: its closing brace, then the format's markup for another call or the end."""
        result = self._match.step(c)
        if result == "more":
            self._held += c
            return
        if result != "fail" and result.tag == "close":
            self._state, self._held = _AFTER, ""
            self._match = _Match(self.fmt.after_call)
            return
        if result != "fail" and result.tag == "call" and result.name in self._names:
            self._start_call(result.name)
            return
        # The run of calls is over: after its end markup, or else at what is read again as content.
        ended = result != "fail" and result.tag == "end"
        self._replay("" if ended else self._held + c)
        self._state, self._held, self._after_call = _CONTENT, "", True
