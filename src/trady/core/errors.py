"""One exception type for bad input: the CLI prints its message as a single line."""

from __future__ import annotations

import difflib


class TradyError(ValueError):
    """A user-facing error whose message names the bad value and what would be accepted."""


def unknown_name(kind: str, value: str, valid: list[str] | tuple[str, ...]) -> TradyError:
    """Error for a misspelled name, suggesting the closest valid ones."""
    close = difflib.get_close_matches(value, list(valid), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return TradyError(f"unknown {kind} {value!r}{hint}; accepted: {', '.join(sorted(valid))}")
