"""Exceptions raised by the data layer.

They all derive from ``ValueError`` so callers that only want "bad input" can catch one type, while
tests and the CLI can tell the cases apart.
"""

from __future__ import annotations


class DataError(ValueError):
    """Input data is missing, malformed or inconsistent with the task (message names file/line)."""


class UnknownTaskError(DataError):
    """A task name that the registry does not know (message lists the known ones)."""


class TokenizerMismatchError(ValueError):
    """Two tokenizers that must agree (teacher vs student, tokenizer vs model) do not."""
