"""The text layer every engine shares: incremental detokenizing, and stop sequences applied to text, not to tokens.

A stop string may span several tokens or part of one, so it can only be matched in decoded text; doing it here, once,
keeps engines to producing tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class StopMatcher:
    """Holds back text that could still become a stop sequence, so a stop is never emitted, even in part."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit; sets ``stopped`` when a stop sequence appears."""
        if not self.stops:
            return text
        if self.stopped:
            return ""
        buffer = self._held + text
        hits = [i for i in (buffer.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buffer[: min(hits)]
        keep = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:size]):
                    keep = size
                    break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation, what was held back was not a stop after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces, in constant work per token.

    Decodes only a short window (vLLM's prefix/read offsets) and holds back text that ends in an
    incomplete UTF-8 sequence (``\\ufffd``) until the next token completes it. A fast tokenizer whose
    ``decode`` adds nothing to its Rust backend's steps through ``tokenizers``' own ``DecodeStream``:
    one native call per token instead of two Python-wrapped decodes.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        backend = getattr(tokenizer, "_tokenizer", None)
        native = isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._backend = backend if native else None
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if native else None

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_tokens: list[int]) -> str:
        if self._stream is not None:
            return self._add_native(new_tokens)
        self.tokens.extend(new_tokens)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        text = self._decode(self.tokens[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return text[len(prefix) :]
        return ""

    def _add_native(self, new_tokens: list[int]) -> str:
        pieces = []
        for token in new_tokens:
            self.tokens.append(token)
            piece = self._stream.step(self._backend, token)
            if piece:  # None while the token does not complete a character yet
                pieces.append(piece)
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.tokens)
        return "".join(pieces)

    def flush(self) -> str:
        """Whatever was held back, at the end of the generation."""
        if self.read_offset == len(self.tokens):
            return ""
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        text = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return text[len(prefix) :] if len(text) > len(prefix) else ""
