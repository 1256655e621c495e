"""The one error a conversion raises: a :class:`~rag_assets.sources.DocumentError` with a kind.

Sources already report a ``DocumentError`` per document and go on with the run (decision 13: bad
input keeps the last good version), so conversion failures reuse it; ``kind`` lets reports and
benchmarks count failures by cause without parsing messages.
"""

from __future__ import annotations

from rag_assets.sources import DocumentError

# Why a document could not be converted (FormatError.kind).
NO_TEXT_LAYER = "no_text_layer"  # a PDF whose pages carry no text (a scan): needs OCR, not indexed as empty
NO_TEXT = "no_text"  # a document with no text at all once scripts/styles/markup are removed
ENCRYPTED = "encrypted"  # needs a password
CORRUPT = "corrupt"  # not a valid file of its format (truncated, broken container, parser failure)
TOO_LARGE = "too_large"  # over a limit: pages, cells, ZIP entries, decompressed size or ratio, memory
TIMEOUT = "timeout"  # the converter ran past the per-document time limit
CRASHED = "crashed"  # the converter process died (a native library crash)
UNSUPPORTED = "unsupported"  # no converter for this format (or a legacy binary Office file)

KINDS = (NO_TEXT_LAYER, NO_TEXT, ENCRYPTED, CORRUPT, TOO_LARGE, TIMEOUT, CRASHED, UNSUPPORTED)


class FormatError(DocumentError):
    """A document could not be converted to Markdown; ``str()`` names the document and the reason."""

    def __init__(self, doc_id: str, kind: str, reason: str):
        if kind not in KINDS:
            raise ValueError(f"unknown FormatError kind {kind!r}")
        super().__init__(doc_id, reason)
        self.kind = kind

    def __reduce__(self):  # picklable, so the worker process can send it back unchanged
        return (FormatError, (self.doc_id, self.kind, self.reason))
