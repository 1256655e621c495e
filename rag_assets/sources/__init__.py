"""Document sources: one interface (``base.Source``), a folder, an S3-compatible bucket, and the
documents webhooks push; the text path that turns bytes into a normalised document.

``open_source`` builds the source an index is bound to (``store/source_binding.py``).
"""

from rag_assets.sources.base import (
    BOUND_SOURCE_TAG,
    Document,
    DocumentChanging,
    DocumentError,
    DocumentGone,
    FileStat,
    RawDocument,
    ScanResult,
    Source,
    SourceError,
)
from rag_assets.sources.documents import (
    document_from_raw,
    make_document,
    normalize_text,
    split_front_matter,
    validate_doc_id,
)
from rag_assets.sources.folder import FolderSource
from rag_assets.sources.globs import GlobMatcher
from rag_assets.sources.metadata import (
    DEFAULT_MAX_METADATA_BYTES,
    MAX_DERIVED_TITLE_CHARS,
    MAX_METADATA_DEPTH,
    RESERVED_META,
    build_metadata,
    first_heading,
)
from rag_assets.sources.open import is_s3_uri, open_source
from rag_assets.sources.webhook import make_webhook_document

__all__ = [
    "BOUND_SOURCE_TAG",
    "DEFAULT_MAX_METADATA_BYTES",
    "MAX_DERIVED_TITLE_CHARS",
    "MAX_METADATA_DEPTH",
    "RESERVED_META",
    "Document",
    "DocumentChanging",
    "DocumentError",
    "DocumentGone",
    "FileStat",
    "FolderSource",
    "GlobMatcher",
    "RawDocument",
    "ScanResult",
    "Source",
    "SourceError",
    "build_metadata",
    "document_from_raw",
    "first_heading",
    "is_s3_uri",
    "make_document",
    "make_webhook_document",
    "normalize_text",
    "open_source",
    "split_front_matter",
    "validate_doc_id",
]
