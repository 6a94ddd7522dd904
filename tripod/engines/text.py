"""The text layer every engine shares: stop sequences applied to decoded text, not to tokens."""

from __future__ import annotations


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
