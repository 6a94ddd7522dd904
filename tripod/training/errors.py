"""Errors a training run reports to its user before (or instead of) a traceback.

The user's config or data is at fault, not the code, so each error names what to fix and where (the key, or the file
and line).
"""

from __future__ import annotations


class TrainingError(Exception):
    """A problem the user can fix: the message says what and where."""


class ConfigError(TrainingError):
    """Every problem found in a training config at once, one per line, each naming its key."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        noun = "problem" if len(self.errors) == 1 else "problems"
        super().__init__(
            f"The training config has {len(self.errors)} {noun}:\n" + "\n".join(f"  - {e}" for e in errors)
        )


class DatasetError(TrainingError):
    """A dataset file that cannot be read or whose records do not fit its format; names file and line."""
