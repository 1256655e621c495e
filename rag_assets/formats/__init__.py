"""Binary documents (PDF, DOCX, PPTX, XLSX, HTML) to Markdown the structure chunker understands.

The API, for a source that has a document's raw bytes::

    from rag_assets.formats import FormatError, FormatLimits, convert, format_for, pages_for_span

    fmt = format_for("reports/q3.pdf")            # 'pdf' (by suffix, else media type), None if not binary
    conv = convert("reports/q3.pdf", data, fmt, FormatLimits.from_settings(settings))
    conv.text                                      # Markdown; conv.pages: PageSpan(number, start, end)
    pages_for_span(conv.pages, chunk.char_start, chunk.char_end)   # -> (3, 4)

With a time limit (native parsers cannot be interrupted in-process) and the parse cache::

    from rag_assets.formats import ConversionWorker, ParseStats, convert_cached
    with ConversionWorker(limits) as worker:
        conv = convert_cached(conn, doc_id, data, fmt, worker=worker, stats=stats)

Every failure is a :class:`FormatError` (a ``rag_assets.sources.DocumentError``) naming the doc id,
with a ``kind`` (``no_text_layer``, ``encrypted``, ``corrupt``, ``too_large``, ``timeout``, ...).
:func:`formats_code_version` changes whenever any converter's name, version or options change.
"""

from rag_assets.formats.cache import ParseStats, content_sha256, convert_cached
from rag_assets.formats.conversion import Conversion, PageSpan, pages_for_span
from rag_assets.formats.errors import KINDS, FormatError
from rag_assets.formats.limits import FormatLimits
from rag_assets.formats.registry import (
    CONVERTERS,
    Converter,
    convert,
    converter_for,
    format_for,
    formats_code_version,
)
from rag_assets.formats.worker import ConversionWorker

__all__ = [
    "CONVERTERS",
    "KINDS",
    "Conversion",
    "ConversionWorker",
    "Converter",
    "FormatError",
    "FormatLimits",
    "PageSpan",
    "ParseStats",
    "content_sha256",
    "convert",
    "convert_cached",
    "converter_for",
    "format_for",
    "formats_code_version",
    "pages_for_span",
]
