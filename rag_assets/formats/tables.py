"""Markdown tables (pure, no parser imports): what sheets, slides and charts are rendered as."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

_WS = re.compile(r"\s+")


def cell_text(value: object) -> str:
    """One table cell as Markdown-safe text: one line, pipes escaped, numbers without float noise."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        text = str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    elif isinstance(value, dt.datetime | dt.date | dt.time):
        text = value.isoformat()
    else:
        text = str(value)
    return _WS.sub(" ", text).strip().replace("|", "\\|")


def table(rows: Sequence[Sequence[object]]) -> str:
    """A Markdown (GFM) table; the first row is the header. Rows are padded to the widest row and
    rows with no text (after the header) are left out; a table with no text at all is ``""``."""
    if not rows or not any(cell_text(v) for r in rows for v in r):
        return ""
    width = max(len(r) for r in rows)
    lines = []
    for i, row in enumerate(rows):
        cells = [cell_text(v) for v in row] + [""] * (width - len(row))
        if i and not any(cells):
            continue
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "---|" * width)
    return "\n".join(lines)
