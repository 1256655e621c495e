"""Binary documents through the converters, on the way from a source's bytes to a ``Document``.

Every source hands over raw bytes (``read_bytes``); for a PDF, DOCX, PPTX, XLSX or HTML document
(``formats.format_for``) this turns them into the converter's Markdown before the text path
(decoding, front matter, metadata) runs, through the parse cache: an unchanged file is never
parsed again, and the same bytes under two names are parsed once. Conversions run in one reused
worker process (time and memory limits), started only when the first binary document arrives.
Page spans travel in the metadata (``page_starts``: the offset of each page in the body) so a
chunk's pages follow from its ``char_start``/``char_end``.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import replace

import psycopg

from rag_assets.formats import ConversionWorker, FormatLimits, ParseStats, convert_cached, format_for
from rag_assets.sources.base import RawDocument


class DocumentConverter:
    """Converts the binary documents a source reads; thread-safe (S3 reads in parallel)."""

    def __init__(self, conn: psycopg.Connection, limits: FormatLimits):
        self.conn = conn
        self.limits = limits
        self.stats = ParseStats()
        self._worker: ConversionWorker | None = None
        self._lock = threading.Lock()

    def needed(self, raw: RawDocument) -> str | None:
        return format_for(raw.doc_id, raw.content_type)

    def to_text(self, raw: RawDocument) -> RawDocument:
        """``raw`` itself for text formats; else the converted Markdown with its page starts."""
        fmt = self.needed(raw)
        if fmt is None:
            return raw
        with self._lock:  # one worker process and one connection: one conversion at a time
            if self._worker is None:
                self._worker = ConversionWorker(self.limits).__enter__()
                atexit.register(self.close)  # the worker process ends with ours
            conv = convert_cached(self.conn, raw.doc_id, raw.data, fmt, worker=self._worker, stats=self.stats)
        meta = dict(raw.source_metadata)
        meta["format"] = fmt
        meta["converter"] = f"{conv.converter} {conv.converter_version}"
        if conv.pages:
            meta["pages"] = len(conv.pages)
            meta["page_starts"] = [p.start for p in conv.pages]
        return replace(raw, data=conv.text.encode("utf-8"), content_type="text/markdown", source_metadata=meta)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.__exit__(None, None, None)
            self._worker = None
