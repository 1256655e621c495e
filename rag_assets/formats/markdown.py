"""Markdown building blocks shared by the converters: tables and HTML -> Markdown."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence

from bs4 import BeautifulSoup
from markdownify import MarkdownConverter

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


class _Converter(MarkdownConverter):
    """markdownify with ATX headings (what the chunker reads), links and images reduced to their text.

    Link targets and escapes (``\\_``) are tokens an embedding pays for and a reader of a chunk
    does not need; the text of the link is what is searched for.
    """

    def convert_a(self, el, text, parent_tags):
        return text

    def convert_img(self, el, text, parent_tags):
        return el.get("alt") or ""


def html_to_markdown(soup: BeautifulSoup) -> str:
    """Markdown of a (cleaned) element tree: ``#`` headings, ``-`` bullets, fenced code, GFM tables."""
    return _Converter(
        heading_style="ATX", bullets="-", code_language="", escape_misc=False, escape_underscores=False, escape_asterisks=False
    ).convert_soup(soup)
