"""Bytes to a normalised :class:`Document`: decoding, front matter, metadata and hashes (pure).

The text path every text format takes (Markdown, reST, plain text), whichever source the bytes
came from (:func:`document_from_raw`); converters for binary formats will hand their Markdown to
the same path.
"""

from __future__ import annotations

import yaml

from rag_assets.front_matter import NotAMapping, Unusable, find_front_matter, load_yaml_mapping, shown
from rag_assets.manifest import content_hash, meta_hash
from rag_assets.sources.base import Document, DocumentError, RawDocument
from rag_assets.sources.metadata import (
    DEFAULT_MAX_METADATA_BYTES,
    _checked_metadata,
    _json_safe,
    build_metadata,
)

_FRONT_MATTER_YAML_FACTOR = 4  # front matter YAML longer than this x the metadata bound is not parsed


def normalize_text(data: bytes, doc_id: str, max_bytes: int) -> str:
    """Decode bytes as UTF-8 (BOM removed) with Unix newlines, or raise ``DocumentError``.

    Binary files are recognised by a NUL byte: valid UTF-8 text never contains one in practice
    and NUL cannot be stored in a PostgreSQL ``text`` column anyway.
    """
    if len(data) > max_bytes:
        raise DocumentError(doc_id, f"document too large ({len(data)} bytes > RAG_MAX_DOC_BYTES={max_bytes})")
    if b"\x00" in data:
        raise DocumentError(doc_id, "binary file (contains NUL bytes); skipped")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(doc_id, f"not valid UTF-8 (byte {e.start}: {e.reason}); skipped") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_front_matter(
    text: str, doc_id: str, max_bytes: int = DEFAULT_MAX_METADATA_BYTES
) -> tuple[dict, str]:
    """Return (front matter as JSON-safe values, body), by the rules of ``rag_assets.front_matter``.
    Front matter that is broken YAML, not a mapping, holds a value JSON cannot (see ``_json_safe``)
    or is larger than ``max_bytes`` is an error naming the document."""
    block = find_front_matter(text)
    if block is None:
        return {}, text
    yaml_text = text[block.yaml_start : block.yaml_end]
    if len(yaml_text) > _FRONT_MATTER_YAML_FACTOR * max_bytes:
        raise DocumentError(
            doc_id,
            f"front matter is {len(yaml_text)} characters of YAML, more than {_FRONT_MATTER_YAML_FACTOR} x "
            f"RAG_MAX_METADATA_BYTES={max_bytes}; not parsed",
        )
    try:
        front = _json_safe(load_yaml_mapping(yaml_text, max_bytes), max_bytes)
    except NotAMapping as e:
        raise DocumentError(doc_id, str(e)) from None
    except yaml.YAMLError as e:
        raise DocumentError(doc_id, f"invalid YAML front matter: {shown(str(e).replace(chr(10), ' '), 300)}") from None
    except Unusable as e:
        raise DocumentError(doc_id, f"unusable front matter: {e}") from None
    except RecursionError:
        raise DocumentError(doc_id, "unusable front matter: nested too deeply") from None
    return front, text[block.end :]


def make_document(
    doc_id: str,
    data: bytes,
    mtime_ns: int,
    max_bytes: int,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
    source_meta: dict | None = None,
    size: int | None = None,
) -> Document:
    """Bytes → normalised ``Document`` with hashes. Pure; raises ``DocumentError`` on bad input,
    metadata that JSON/jsonb cannot hold as it is, or metadata over ``max_metadata_bytes``.
    ``source_meta``: keys the source vouches for (see :class:`RawDocument`), checked by the same
    strict JSON rules as front matter."""
    validate_doc_id(doc_id)
    text = normalize_text(data, doc_id, max_bytes)
    if source_meta:
        try:
            source_meta = _json_safe(source_meta, max_metadata_bytes)
        except Unusable as e:
            raise DocumentError(doc_id, f"unusable source metadata: {e}") from None
    front, body = split_front_matter(text, doc_id, max_metadata_bytes)
    # ``size`` is the source's (the file's, before any conversion): the fast path compares it with the stat
    size = len(data) if size is None else size
    meta = _checked_metadata(
        doc_id, build_metadata(doc_id, front, body, size, mtime_ns, source_meta), max_metadata_bytes
    )
    return Document(doc_id, body, meta, size, mtime_ns, content_hash(body), meta_hash(meta))


def validate_doc_id(doc_id: str) -> None:
    """Ids must be storable and unambiguous: non-empty UTF-8 without NUL or control characters."""
    if not doc_id:
        raise DocumentError("<empty id>", "document id is empty")
    if "\x00" in doc_id:
        raise DocumentError(doc_id.replace("\x00", "\\0"), "document id contains a NUL character")
    try:
        doc_id.encode("utf-8")
    except UnicodeEncodeError:
        raise DocumentError(
            doc_id.encode("utf-8", "backslashreplace").decode(), "file name is not valid UTF-8"
        ) from None
    if len(doc_id.encode("utf-8")) > 2048:
        raise DocumentError(doc_id[:80] + "…", "document id longer than 2048 bytes")


def document_from_raw(
    raw: RawDocument, max_bytes: int, max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES
) -> Document:
    """The text path for a source's bytes: decode, front matter, metadata (the source's keys win)."""
    return make_document(
        raw.doc_id,
        raw.data,
        raw.stat.mtime_ns,
        max_bytes,
        max_metadata_bytes,
        raw.source_metadata or None,
        size=raw.stat.size,
    )
