"""Text for people: bytes, percentages and errors as short strings, plain or Markdown tables, and
file-name-safe forms of values.

One place for what the CLI commands, the report and the benchmarks print, so that a figure reads
the same everywhere. No domain logic here: callers pass numbers and cells.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def fmt_bytes(n: float | None, digits: int = 1) -> str:
    """A byte count in the largest binary unit it reaches (1.5 MiB, 300 B); "-" for None."""
    if n is None:
        return "-"
    for unit, size in _BYTE_UNITS:
        if abs(n) >= size:
            return f"{n / size:.{digits}f} {unit}"
    return f"{n:.0f} B"


def mib(n: float | None, digits: int = 2, unit: str = " MiB") -> str:
    """A byte count in MiB (fixed unit, for columns that compare); "-" for None."""
    return "-" if n is None else f"{n / 2**20:.{digits}f}{unit}"


def pct(fraction: float | None, digits: int = 1) -> str:
    """A fraction as a percentage (0.123 -> "12.3%"); "-" for None."""
    return "-" if fraction is None else f"{100 * fraction:.{digits}f}%"


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """An error message on one line, cut to `limit` characters (for one-line TradyErrors)."""
    text = " ".join(str(err).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def sanitise(value: Any) -> str:
    """A file-name-safe, readable form of a value ("2.2%" -> "2.2pct", "/a/b" -> "a-b")."""
    text = str(value).replace("%", "pct")
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    text = re.sub(r"-{2,}", "-", text).strip("-.")
    return text or "x"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False,
                 left: int = 1) -> str:
    """A table of string cells: columns before `left` are left-aligned, the rest right-aligned.
    Plain text: padded columns, a dashed rule under the header. Markdown: a pipe table."""
    header = [str(c) for c in header]
    body = [[str(c) for c in row] for row in rows]
    if markdown:
        seps = ["---" if i < left else "---:" for i in range(len(header))]
        lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(seps) + " |"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths).rstrip(), *map(line, body)])
