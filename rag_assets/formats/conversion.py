"""What a converter returns: Markdown text plus the page (slide, sheet) each character came from.

Converters produce Markdown because the structure chunker (``rag_assets.chunking``) cuts along
``#`` headings and blank-line blocks; page spans are kept beside the text rather than inside it
(no "Page 3" markers in the text), so a chunk's text and hash do not depend on pagination markers
and each chunk can still cite its pages with :func:`pages_for_span`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass

PAGE_SEPARATOR = "\n\n"  # between pages: always a block boundary for the chunker

_BLANK_RUNS = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t\r\f\v]+\n")
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class PageSpan:
    """Page (slide, sheet) ``number`` (1-based, as a reader would cite it) covers ``text[start:end]``."""

    number: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Conversion:
    """A converted document: Markdown ``text``, its page spans (empty for formats without pages:
    DOCX, HTML), and the converter that made it (name and version, as recorded in the parse cache)."""

    text: str
    pages: tuple[PageSpan, ...]
    converter: str
    converter_version: str


def clean_text(text: str) -> str:
    """Normalise converter output: LF line ends, no control characters (Postgres text refuses NUL),
    no lone surrogates, no trailing spaces, at most one blank line in a row, stripped ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", _LONE_SURROGATE.sub("\ufffd", text))
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def join_pages(parts: Iterable[tuple[int, str]]) -> tuple[str, tuple[PageSpan, ...]]:
    """Join ``(page number, page text)`` into one text with :data:`PAGE_SEPARATOR` and the spans.

    Each page text is cleaned first, so the offsets are those of the final text. A page with no
    text gets no span (nothing in the text came from it) but keeps its number for the others.
    """
    out: list[str] = []
    spans: list[PageSpan] = []
    pos = 0
    for number, raw in parts:
        text = clean_text(raw)
        if not text:
            continue
        if out:
            out.append(PAGE_SEPARATOR)
            pos += len(PAGE_SEPARATOR)
        spans.append(PageSpan(number, pos, pos + len(text)))
        out.append(text)
        pos += len(text)
    return "".join(out), tuple(spans)


def pages_for_span(pages: tuple[PageSpan, ...], start: int, end: int) -> tuple[int, ...]:
    """The page numbers a chunk ``text[start:end]`` overlaps, in order (pure; O(log n + k)).

    Spans are sorted and disjoint (as :func:`join_pages` makes them). A chunk that lies only in a
    separator between two pages (whitespace) is attributed to the page before it. No pages: ``()``.
    """
    if not pages:
        return ()
    if end <= start:
        end = start + 1
    starts = [p.start for p in pages]
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    found: list[int] = []
    for p in pages[i:]:
        if p.start >= end:
            break
        if p.end > start:
            found.append(p.number)
    if not found:
        j = bisect.bisect_right(starts, start) - 1
        return (pages[j].number,) if j >= 0 else (pages[0].number,)
    return tuple(found)
