"""Grammar-constrained decoding with llguidance: structured outputs (``response_format``) and forced tool calls.

Each step a request's ``GrammarMatcher`` fills a row of a token bitmask (one bit per vocabulary entry) with the tokens
its grammar allows; the engine sets every other logit to -inf before sampling, then feeds the chosen token back.

Two rules keep a constrained reply from running on until ``max_tokens`` cuts it off as invalid JSON:

- the JSON grammar is compact: no whitespace between tokens at all (vLLM's xgrammar bug was a reply of
  ``{\\r  "colour":\\r\\r ...`` that a random or confused model never closed);
- near the end of the token budget (no more left than the grammar's shortest reply plus ``CLOSING_MARGIN``) the
  closing guard narrows the grammar's tokens to the ones that close what is open: a quote inside a string, else
  brackets, a required comma, short literal values; where none is allowed (a forced key) the grammar's own mask
  stays, so a reply still finishes valid for its schema.

Once the grammar is complete only end-of-sequence is allowed, so the engine ends with finish_reason "stop".
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import torch
from llguidance import LLMatcher
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

from tripod.errors import InvalidRequest
from tripod.protocol import ResponseFormat, SamplingParams

if TYPE_CHECKING:
    from tripod.engines.tool_calls import ToolCallFormat

# No whitespace anywhere and the default "," and ":" separators: the grammar has one spelling per value.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
JSON_OBJECT_SCHEMA = '{"type": "object"}'

# The closing guard starts when the tokens left in the budget are no more than the grammar's shortest reply (its
# required keys and one-token values, found once per grammar by running the guard from the start) plus this margin:
# one token to close an open string and one for each bracket open beyond the shortest reply's (``]]}`` is often one
# token), and slack for a sampled closer shorter than the one the shortest reply took. Eight covers three levels of
# nesting; past that a reply may still end cut, as it would without the guard.
CLOSING_MARGIN = 8
_LONGEST_SHORTEST_REPLY = 512  # a grammar whose shortest reply is longer gets a guard from its first token

# What moves a reply toward its end, best first. Inside a string: a closing quote (with closing brackets after it).
# Elsewhere: closing brackets (or the end); then a comma the grammar requires (a number would otherwise grow digit by
# digit); then a short literal value.
_IN_STRING_TIERS = (re.compile(rb'"[}\]]*'),)
_TIERS = (re.compile(rb"[}\]]+"), re.compile(rb",.*", re.S), re.compile(rb'(?:\d+|null|true|false|""|\{\}|\[\])[}\]]*'))

_CACHED_GRAMMARS = 256  # compiled grammars kept per model, least recently used dropped


def response_format_grammar(fmt: ResponseFormat) -> str:
    """The llguidance grammar that enforces ``fmt``: compact JSON for its schema, any object for json_object."""
    schema = fmt.schema if fmt.type == "json_schema" and fmt.schema is not None else JSON_OBJECT_SCHEMA
    return LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT_JSON)


def validate_response_format(fmt: ResponseFormat) -> str | None:
    """Why ``fmt`` cannot be enforced, or None; needs no tokenizer (the web edge has none)."""
    if fmt.type == "json_schema" and fmt.schema is not None:
        try:
            json.loads(fmt.schema)
        except ValueError as exc:
            return f"The JSON schema is not valid JSON: {exc}"
    try:
        grammar = response_format_grammar(fmt)
    except ValueError as exc:
        return f"The JSON schema cannot be enforced: {exc}"
    error = LLMatcher.validate_grammar(grammar)
    return f"The JSON schema cannot be enforced: {error}" if error else None


def validate_grammar_text(lark: str) -> str | None:
    """Why the Lark grammar ``lark`` is invalid, or None; needs no tokenizer."""
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(lark))
    return f"The grammar is invalid: {error}" if error else None


def request_grammar(params: SamplingParams, tool_format: ToolCallFormat | None, tokenizer=None) -> str | None:
    """The grammar a request's reply must follow: its response_format, else a forced tool call, else none.

    ``tokenizer`` lets a forced call's markers that are added tokens (``<tool_call>``) be named by their ids."""
    if params.response_format is not None:
        return response_format_grammar(params.response_format)
    if params.tools is not None and params.tools.forced:
        if tool_format is None:
            raise InvalidRequest(
                "This model has no tool-call format, so a tool call cannot be forced.",
                param="tool_choice",
                code="unsupported_value",
            )
        return LLMatcher.grammar_from_lark(tool_format.call_grammar(params.tools, tokenizer))
    return None


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """A bool vector over the vocabulary as llguidance's bitmask row: int32 words, token ``32*w + j`` in bit ``j``."""
    words = -(-allowed.numel() // 32)
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[: allowed.numel()] = allowed.to(torch.int64)
    packed = (bits.view(words, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_bits(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The bitmask rows ``[rows, words]`` as bools ``[rows, vocab_size]``, on the bitmask's device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.size(0), -1)[:, :vocab_size].bool()


def apply_bitmask(scores: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``scores`` with every token the bitmask rows do not allow at -inf (a new tensor)."""
    allowed = unpack_bits(bitmask.to(scores.device, non_blocking=True), scores.size(-1))
    return scores.masked_fill(~allowed, float("-inf"))


class ModelGrammars:
    """One model's llguidance tokenizer, its compiled grammars and the closing guard's token sets.

    Compiling a grammar (a JSON schema's lexer and parser tables) happens once per distinct grammar; each request
    gets a copy of the compiled matcher, which costs microseconds.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        self.pieces = [
            b"" if self.tokenizer.is_special_token(t) else self.tokenizer.decode_bytes([t]) for t in range(vocab_size)
        ]
        eos = torch.zeros(vocab_size, dtype=torch.bool)
        eos[sorted(eos_ids)] = True
        self.eos_only = pack_bits(eos)
        self.in_string_tiers = tuple(self._tier(pattern) for pattern in _IN_STRING_TIERS)
        # Ending is the best way to close, where the grammar allows it.
        self.tiers = (pack_bits(self._matching(_TIERS[0]) | eos), *(self._tier(pattern) for pattern in _TIERS[1:]))
        self._compiled: OrderedDict[str, tuple[LLMatcher, int]] = OrderedDict()
        self._lock = threading.Lock()

    def _matching(self, pattern: re.Pattern) -> torch.Tensor:
        return torch.tensor([bool(piece) and pattern.fullmatch(piece) is not None for piece in self.pieces])

    def _tier(self, pattern: re.Pattern) -> torch.Tensor:
        return pack_bits(self._matching(pattern))

    def compile(self, grammar: str) -> tuple[LLMatcher, int]:
        """The compiled matcher for ``grammar`` and its shortest reply in tokens, cached by grammar."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(
                f"The grammar cannot be enforced: {matcher.get_error()}", param="response_format", code="invalid_value"
            )
        compiled = matcher, self._shortest_reply(matcher)
        with self._lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > _CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled

    def _shortest_reply(self, matcher: LLMatcher) -> int:
        """Tokens the closing guard takes to finish a reply from the start, end-of-sequence included."""
        trial = GrammarMatcher(self, matcher.deep_copy(), max_tokens=0, closing_budget=_LONGEST_SHORTEST_REPLY)
        bitmask = self.bitmask(1)
        lengths = torch.tensor([len(piece) for piece in self.pieces])
        while not trial.done and trial.generated < _LONGEST_SHORTEST_REPLY:
            trial.mask(bitmask, 0)
            allowed = unpack_bits(bitmask, self.vocab_size)[0]
            trial.consume(int(torch.where(allowed, lengths, -1).argmax()))  # the longest piece: fewest tokens
        return trial.generated + 1

    def matcher(self, grammar: str, max_tokens: int) -> GrammarMatcher:
        """A fresh matcher for one request that may generate ``max_tokens`` tokens."""
        compiled, shortest = self.compile(grammar)
        return GrammarMatcher(self, compiled.deep_copy(), max_tokens, closing_budget=shortest + CLOSING_MARGIN)

    def bitmask(self, rows: int) -> torch.Tensor:
        """A host bitmask for ``rows`` matchers, every token allowed until a matcher fills its row."""
        return allocate_token_bitmask(rows, self.vocab_size)


class GrammarMatcher:
    """One request's place in its grammar: ``mask`` a bitmask row before each step, ``consume`` the chosen token."""

    def __init__(self, grammars: ModelGrammars, matcher: LLMatcher, max_tokens: int, closing_budget: int) -> None:
        self.grammars = grammars
        self.matcher = matcher
        self.max_tokens = max_tokens
        self.closing_budget = closing_budget
        self.generated = 0
        # Whether the reply is inside a JSON string, which the closing guard must close first (a bracket there is text).
        self.in_string = False
        self._escaped = False

    @property
    def done(self) -> bool:
        """Whether the grammar is complete (or broken): only end-of-sequence may follow."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def consume(self, token_id: int) -> None:
        """Advance past the token the engine chose (end-of-sequence after the end changes nothing)."""
        self.generated += 1
        if self.done:
            return
        self.matcher.consume_token(token_id)
        for byte in self.grammars.pieces[token_id]:
            if self._escaped:
                self._escaped = False
            elif byte == 0x5C and self.in_string:  # a backslash escapes the next character
                self._escaped = True
            elif byte == 0x22:  # a quote opens or closes a string
                self.in_string = not self.in_string

    def mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (a host tensor), the closing guard applied."""
        words = bitmask[row]
        if self.done:
            words.copy_(self.grammars.eos_only)
            return
        fill_next_token_bitmask(self.matcher, bitmask, row)
        if self.max_tokens - self.generated > self.closing_budget:
            return
        for tier in self.grammars.in_string_tiers if self.in_string else self.grammars.tiers:
            narrowed = words & tier
            if narrowed.any():
                words.copy_(narrowed)
                return
