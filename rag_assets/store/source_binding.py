"""Which source an index is built from: recorded once, used by every path, changed only on purpose.

The root is a folder (recorded absolute and resolved) or an ``s3://bucket/prefix/`` URI.

Why: the sensors, the service applier and ``rag-assets dev`` used to read ``RAG_SOURCE_PATH``
(default ``samples/corpus``, relative to the working directory). One webhook then deleted every real
document and indexed the sample corpus instead. Now the first folder indexed is recorded in
``settings`` (absolute root, include and exclude globs); every path reads that record, and
pointing an existing index at another folder or other globs needs an explicit ``--change-source``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from rag_assets.settings import SettingsError

KEY = "source"


class SourceMismatch(SettingsError):
    """The folder (or globs) asked for is not the one this index was built from."""


@dataclass(frozen=True)
class SourceSpec:
    """An index's folder source: where and which files."""

    root: str  # absolute, resolved folder, or s3://bucket/prefix/
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    @classmethod
    def of(cls, root: Path | str, include, exclude) -> SourceSpec:
        from rag_assets.sources.open import canonical_root

        return cls(canonical_root(root), tuple(include), tuple(exclude))

    def as_json(self) -> dict:
        return {"root": self.root, "include": list(self.include), "exclude": list(self.exclude)}

    def describe(self) -> str:
        ex = f", exclude {','.join(self.exclude)}" if self.exclude else ""
        return f"{self.root} (include {','.join(self.include) or '(nothing)'}{ex})"


def load_binding(conn: psycopg.Connection) -> SourceSpec | None:
    row = conn.execute("SELECT value FROM settings WHERE key = %s", (KEY,)).fetchone()
    if row is None:
        return None
    v = row[0] if isinstance(row[0], dict) else json.loads(row[0])
    return SourceSpec(v["root"], tuple(v.get("include") or ()), tuple(v.get("exclude") or ()))


def bind_source(conn: psycopg.Connection, spec: SourceSpec, *, change: bool = False) -> SourceSpec | None:
    """Record ``spec`` as the index's source. Returns the previous binding (None if first).

    Raises :class:`SourceMismatch` naming both sources when another one is recorded and ``change``
    is False. Concurrent first binds agree or one of them fails the same way.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.source_binding'))")
        old = load_binding(conn)
        if old == spec:
            return old
        if old is not None and not change:
            raise SourceMismatch(
                f"this index was built from {old.describe()}, not {spec.describe()}: refusing to index "
                "another source into it (that would delete its documents). Use the same folder and "
                "RAG_INCLUDE/RAG_EXCLUDE, or pass --change-source to point the index at the new one on purpose"
            )
        conn.execute(
            "INSERT INTO settings (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (KEY, Jsonb(spec.as_json())),
        )
    return old


def folder_documents(conn: psycopg.Connection) -> int:
    """Documents of the bound source (folder or bucket: one manifest tag, ``BOUND_SOURCE_TAG``)."""
    return conn.execute("SELECT count(*) FROM manifest WHERE source = 'folder'").fetchone()[0]


def bound_folder(conn: psycopg.Connection, settings) -> SourceSpec | None:
    """The folder every path without an explicit one reads (sensors, service, assets, audit).

    The recorded binding; for an index with no binding and no folder documents yet, the configured
    ``RAG_SOURCE_URI`` (an ``s3://`` URI, or a folder if it exists), else ``RAG_SOURCE_PATH`` if it
    exists (the first build from ``dagster dev``), which is then recorded; otherwise None: the index
    has no source (webhook documents only) and no source work is done.
    """
    from rag_assets.sources.open import is_s3_uri

    bound = load_binding(conn)
    if bound is None and folder_documents(conn) == 0:
        root = settings.source_uri or settings.source_path
        if is_s3_uri(root) or Path(root).is_dir():
            bound = SourceSpec.of(root, settings.include, settings.exclude)
            bind_source(conn, bound)
    return bound
