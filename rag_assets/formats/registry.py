"""Which converter handles which format, the converter keys, and ``convert`` itself.

A converter key (name, version, options) identifies exactly what produced a Markdown text: the
parse cache is keyed by it, and :func:`formats_code_version` combines all of them so that a
converter upgrade changes the Dagster code_version of the steps that parse (their shards show stale).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from rag_assets.formats import pdf, sheets, slides, webpage, word
from rag_assets.formats.conversion import Conversion
from rag_assets.formats.errors import CORRUPT, TOO_LARGE, UNSUPPORTED, FormatError
from rag_assets.formats.limits import FormatLimits


@dataclass(frozen=True, slots=True)
class Converter:
    """One format's converter: ``fn(doc_id, data, limits) -> Conversion``."""

    format: str  # pdf, docx, pptx, xlsx, html
    name: str
    version: str
    options: str
    suffixes: tuple[str, ...]
    media_types: tuple[str, ...]
    fn: Callable[[str, bytes, FormatLimits], Conversion]

    @property
    def key(self) -> str:
        """The parse-cache key part: name + version + options (what determines the output)."""
        return f"{self.name}@{self.version}#{self.options}"


CONVERTERS: dict[str, Converter] = {
    c.format: c
    for c in (
        Converter("pdf", pdf.NAME, pdf.VERSION, pdf.OPTIONS, (".pdf",), ("application/pdf",), pdf.convert_pdf),
        Converter(
            "docx", word.NAME, word.VERSION, word.OPTIONS, (".docx",),
            ("application/vnd.openxmlformats-officedocument.wordprocessingml.document",), word.convert_docx,
        ),
        Converter(
            "pptx", slides.NAME, slides.VERSION, slides.OPTIONS, (".pptx",),
            ("application/vnd.openxmlformats-officedocument.presentationml.presentation",), slides.convert_pptx,
        ),
        Converter(
            "xlsx", sheets.NAME, sheets.VERSION, sheets.OPTIONS, (".xlsx", ".xlsm"),
            ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
             "application/vnd.ms-excel.sheet.macroEnabled.12"), sheets.convert_xlsx,
        ),
        Converter(
            "html", webpage.NAME, webpage.VERSION, webpage.OPTIONS, (".html", ".htm", ".xhtml"),
            ("text/html", "application/xhtml+xml"), webpage.convert_html,
        ),
    )
}

SUFFIXES: dict[str, str] = {s: c.format for c in CONVERTERS.values() for s in c.suffixes}
MEDIA_TYPES: dict[str, str] = {m: c.format for c in CONVERTERS.values() for m in c.media_types}


def format_for(name: str, media_type: str | None = None) -> str | None:
    """The format of a document from its file name / key (by suffix), else its media type; None if none."""
    fmt = SUFFIXES.get(PurePosixPath(name).suffix.lower())
    if fmt is None and media_type:
        fmt = MEDIA_TYPES.get(media_type.split(";")[0].strip().lower())
    return fmt


def converter_for(fmt: str) -> Converter:
    try:
        return CONVERTERS[fmt]
    except KeyError:
        raise ValueError(f"no converter for format {fmt!r} (known: {', '.join(CONVERTERS)})") from None


def formats_code_version() -> str:
    """One short version for all converters (names + versions + options): a Dagster ``code_version``."""
    keys = "\n".join(CONVERTERS[f].key for f in sorted(CONVERTERS))
    return "formats-" + hashlib.sha256(keys.encode()).hexdigest()[:16]


def convert(doc_id: str, data: bytes, fmt: str, limits: FormatLimits | None = None) -> Conversion:
    """Convert one document in this process; every failure is a :class:`FormatError` naming ``doc_id``.

    No time limit here (a native library cannot be interrupted from Python): use
    :class:`~rag_assets.formats.worker.ConversionWorker` for that.
    """
    limits = limits or FormatLimits()
    if fmt not in CONVERTERS:
        raise FormatError(doc_id, UNSUPPORTED, f"no converter for format {fmt!r}")
    try:
        return CONVERTERS[fmt].fn(doc_id, data, limits)
    except FormatError:
        raise
    except MemoryError:
        raise FormatError(doc_id, TOO_LARGE, f"{fmt.upper()} needs more memory than allowed to convert") from None
    except RecursionError:
        raise FormatError(doc_id, TOO_LARGE, f"{fmt.upper()} is nested too deeply to convert") from None
    except Exception as e:  # a parser's own error: the file is not what it claims to be
        raise FormatError(doc_id, CORRUPT, f"not a readable {fmt.upper()} ({type(e).__name__}: {e})"[:500]) from None
