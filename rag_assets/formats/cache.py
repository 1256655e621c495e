"""The parse cache: a conversion is stored once per (SHA-256 of the raw bytes, converter key).

So an unchanged file is never parsed again (whatever its name, source or index: the table lives
in the shared schema ``rag_cache``), the same bytes under two doc ids are parsed once, and a
converter upgrade (a new key) parses again while old entries stay for indexes still on the old
version. Failures are not cached: a source already keeps a failing file from being re-read until
it changes (``source_errors``), and a timeout under load should not be remembered forever.

Functions take an open psycopg connection (autocommit or inside the caller's transaction).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import psycopg

from rag_assets.formats.conversion import Conversion, PageSpan
from rag_assets.formats.limits import FormatLimits
from rag_assets.formats.registry import convert, converter_for
from rag_assets.formats.worker import ConversionWorker


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(slots=True)
class ParseStats:
    """What a series of :func:`convert_cached` calls did (hits parsed nothing)."""

    hits: int = 0
    misses: int = 0
    bytes_parsed: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # FormatError.kind -> count (counted by the caller)


def lookup(conn: psycopg.Connection, sha256: str, converter_key: str) -> Conversion | None:
    row = conn.execute(
        """SELECT text, converter, converter_version, page_numbers, page_starts, page_ends
           FROM rag_cache.parse_cache WHERE content_sha256 = %s AND converter_key = %s""",
        (sha256, converter_key),
    ).fetchone()
    if row is None:
        return None
    text, name, version, numbers, starts, ends = row
    return Conversion(text, tuple(PageSpan(n, s, e) for n, s, e in zip(numbers, starts, ends, strict=True)), name, version)


def store(conn: psycopg.Connection, sha256: str, converter_key: str, conversion: Conversion) -> None:
    """Insert a conversion; a concurrent writer of the same key wins harmlessly (same bytes, same key)."""
    conn.execute(
        """INSERT INTO rag_cache.parse_cache
             (content_sha256, converter_key, converter, converter_version, text, page_numbers, page_starts, page_ends)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (content_sha256, converter_key) DO NOTHING""",
        (
            sha256,
            converter_key,
            conversion.converter,
            conversion.converter_version,
            conversion.text,
            [p.number for p in conversion.pages],
            [p.start for p in conversion.pages],
            [p.end for p in conversion.pages],
        ),
    )


def convert_cached(
    conn: psycopg.Connection,
    doc_id: str,
    data: bytes,
    fmt: str,
    *,
    limits: FormatLimits | None = None,
    worker: ConversionWorker | None = None,
    stats: ParseStats | None = None,
    converter_key: str | None = None,
) -> Conversion:
    """The conversion of ``data`` from the cache, else converted (in ``worker`` if given) and stored.

    Raises :class:`~rag_assets.formats.errors.FormatError` naming ``doc_id`` when it cannot be
    converted. ``converter_key`` overrides the current converter's key (tests, migrations).
    """
    key = converter_key or converter_for(fmt).key
    sha = content_sha256(data)
    found = lookup(conn, sha, key)
    if found is not None:
        if stats is not None:
            stats.hits += 1
        return found
    conversion = worker.convert(doc_id, data, fmt) if worker is not None else convert(doc_id, data, fmt, limits)
    store(conn, sha, key, conversion)
    if stats is not None:
        stats.misses += 1
        stats.bytes_parsed += len(data)
    return conversion
