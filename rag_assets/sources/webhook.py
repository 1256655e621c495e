"""Documents pushed by webhooks: not scanned (they arrive as inbox events), read from the event.

They are the push half of the source interface: the same normalisation, metadata rules and
:class:`Document` shape as a file, with the event's ``metadata`` in place of front matter.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from rag_assets.front_matter import Unusable as _Unusable
from rag_assets.manifest import content_hash, meta_hash
from rag_assets.sources.base import Document, DocumentError
from rag_assets.sources.documents import validate_doc_id
from rag_assets.sources.metadata import (
    DEFAULT_MAX_METADATA_BYTES,
    _checked_metadata,
    _json_safe,
    build_metadata,
)


def make_webhook_document(
    doc_id: str,
    content: str,
    metadata: Mapping,
    source_time: dt.datetime,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> Document:
    """A document pushed by a webhook: same normalisation, metadata rules and shape as a file.

    ``mtime`` is the time the source says it changed the document, so the newest-wins rule and
    the metadata agree.
    """
    validate_doc_id(doc_id)
    if not isinstance(content, str):
        raise DocumentError(doc_id, f"content must be text, not {type(content).__name__}")
    if "\x00" in content:
        raise DocumentError(doc_id, "content contains NUL characters")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DocumentError(doc_id, f"content contains a lone surrogate at character {e.start}") from None
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise DocumentError(doc_id, f"metadata must be an object, not {type(metadata).__name__}")
    try:
        front = _json_safe(dict(metadata), max_metadata_bytes)
    except _Unusable as e:
        raise DocumentError(doc_id, f"unusable metadata: {e}") from None
    except RecursionError:
        raise DocumentError(doc_id, "unusable metadata: nested too deeply") from None
    text = content.replace("\r\n", "\n").replace("\r", "\n")
    size = len(text.encode("utf-8"))
    mtime_ns = int(source_time.timestamp() * 1_000_000) * 1000
    meta = _checked_metadata(doc_id, build_metadata(doc_id, front, text, size, mtime_ns), max_metadata_bytes)
    return Document(doc_id, text, meta, size, mtime_ns, content_hash(text), meta_hash(meta))
