"""The manifest stage: record, per shard and in one transaction, what the sources now contain."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

from rag_assets.manifest import ManifestDiff, ManifestEntry, diff_manifests, shard_version
from rag_assets.store.db import analyze_if_changed, lock_shards


@dataclass(frozen=True, slots=True)
class DocUpdate:
    """The new state of one document: its manifest entry plus metadata, and its body when read."""

    entry: ManifestEntry
    metadata: dict
    body: str | None  # None when the document was not re-read (stat unchanged)
    source_time: datetime | None = None  # when the source changed it (webhooks: newest wins)


def load_manifest(conn: psycopg.Connection, shards: Iterable[int] | None = None) -> dict[str, ManifestEntry]:
    """Manifest entries (all, or those of ``shards``)."""
    q = "SELECT doc_id, shard, content_hash, meta_hash, size, mtime_ns, source FROM manifest"
    params: tuple = ()
    if shards is not None:
        q += " WHERE shard = ANY(%s)"
        params = (sorted(set(shards)),)
    with conn.cursor() as cur:
        cur.execute(q, params)
        return {r[0]: ManifestEntry(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in cur}


def manifest_versions(conn: psycopg.Connection) -> dict[int, str]:
    return dict(conn.execute("SELECT shard, manifest_version FROM shard_state").fetchall())


def apply_manifest(
    conn: psycopg.Connection,
    shards: Iterable[int],
    updates: Mapping[str, DocUpdate],
    *,
    source: str = "folder",
    full_snapshot: bool = True,
    deletes: Iterable[str] = (),
) -> tuple[ManifestDiff, dict[int, str]]:
    """Make the manifest of ``shards`` match ``updates`` for ``source``, in one transaction.

    ``full_snapshot=True`` (a folder scan): ``updates`` is the complete new state of the source in
    these shards, so documents of the source that are absent are deleted. ``False`` (webhook
    events): only the given documents change, and ``deletes`` names removed ones.
    Returns the diff and the new manifest version of each shard.
    """
    shards = sorted(set(shards))
    with conn.transaction():
        lock_shards(conn, shards)
        current = load_manifest(conn, shards)
        old = {d: e for d, e in current.items() if e.source == source}
        if full_snapshot:
            new = {d: u.entry for d, u in updates.items()}
        else:
            new = dict(old)
            new.update({d: u.entry for d, u in updates.items()})
            for d in deletes:
                new.pop(d, None)
        diff = diff_manifests(old, new)
        for d in diff.modified + diff.added:
            if updates[d].body is None:
                raise ValueError(f"{d}: content changed but no body was supplied")
        _write(conn, diff, updates)
        merged = {d: e for d, e in current.items() if e.source != source}
        merged.update(new)
        versions: dict[int, list[ManifestEntry]] = {s: [] for s in shards}
        for e in merged.values():
            if e.shard in versions:
                versions[e.shard].append(e)
        out = {s: shard_version(v) for s, v in versions.items()}
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO shard_state (shard, manifest_version) VALUES (%s, %s) "
                "ON CONFLICT (shard) DO UPDATE SET manifest_version = EXCLUDED.manifest_version, "
                "updated_at = now() WHERE shard_state.manifest_version <> EXCLUDED.manifest_version",
                list(out.items()),
            )
    analyze_if_changed(conn, "manifest", len(diff.added) + len(diff.modified) + len(diff.deleted))
    return diff, out


def _write(conn: psycopg.Connection, diff: ManifestDiff, updates: Mapping[str, DocUpdate]) -> None:
    with conn.cursor() as cur:
        if diff.deleted:
            cur.execute("DELETE FROM manifest WHERE doc_id = ANY(%s)", (diff.deleted,))
            cur.execute("DELETE FROM document_bodies WHERE doc_id = ANY(%s)", (diff.deleted,))
        upserts = diff.added + diff.modified + diff.metadata_only
        if upserts:
            cur.execute("CREATE TEMP TABLE manifest_in (LIKE manifest INCLUDING DEFAULTS) ON COMMIT DROP")
            with cur.copy(
                "COPY manifest_in (doc_id, shard, source, content_hash, meta_hash, size, mtime_ns, metadata,"
                " source_time)"
                " FROM STDIN (FORMAT BINARY)"
            ) as cp:
                cp.set_types(["text", "int2", "text", "text", "text", "int8", "int8", "jsonb", "timestamptz"])
                for d in upserts:
                    u = updates[d]
                    e = u.entry
                    cp.write_row(
                        (
                            e.doc_id,
                            e.shard,
                            e.source,
                            e.content_hash,
                            e.meta_hash,
                            e.size,
                            e.mtime_ns,
                            Jsonb(u.metadata),
                            u.source_time,
                        )
                    )
            cur.execute(
                """INSERT INTO manifest (doc_id, shard, source, content_hash, meta_hash, size,
                       mtime_ns, metadata, source_time, updated_at)
                   SELECT doc_id, shard, source, content_hash, meta_hash, size, mtime_ns, metadata,
                       source_time, now() FROM manifest_in
                   ON CONFLICT (doc_id) DO UPDATE SET shard = EXCLUDED.shard, source = EXCLUDED.source,
                       content_hash = EXCLUDED.content_hash, meta_hash = EXCLUDED.meta_hash,
                       size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, metadata = EXCLUDED.metadata,
                       source_time = EXCLUDED.source_time, updated_at = now()"""
            )
        bodies = diff.added + diff.modified
        if bodies:
            cur.execute("DELETE FROM document_bodies WHERE doc_id = ANY(%s)", (bodies,))
            with cur.copy("COPY document_bodies (doc_id, body) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(["text", "text"])
                for d in bodies:
                    cp.write_row((d, updates[d].body))
