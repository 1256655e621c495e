"""Consistency checks over a set of shards, shared by the Dagster asset checks and the audit.

Each check returns the number of violations and a few examples, computed in SQL against the real
tables, so a check passing means the serving rows really are the chunks of the current documents.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from rag_assets.sources import DocumentError, DocumentGone, Source
from rag_assets.store import schema
from rag_assets.store.serving import Generation


@dataclass
class CheckResult:
    name: str
    violations: int
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.violations == 0


def rows_match_chunks(conn: psycopg.Connection, gen: Generation, shards: Iterable[int]) -> CheckResult:
    """Serving rows of ``shards`` = the chunks of their current documents (ids, positions, text)."""
    shards = sorted(set(shards))
    items, pos = schema.items_table(gen.id), schema.pos_table(gen.id)
    missing, extra, mismatch = conn.execute(
        sql.SQL(
            """SELECT
                 (SELECT count(*) FROM chunks c WHERE c.shard = ANY(%(s)s) AND (
                     NOT EXISTS (SELECT 1 FROM {items} i WHERE i.chunk_id = c.chunk_id)
                     OR NOT EXISTS (SELECT 1 FROM {pos} p WHERE p.chunk_id = c.chunk_id AND p.seq = c.seq))),
                 (SELECT count(*) FROM {items} i WHERE i.shard = ANY(%(s)s) AND NOT EXISTS (
                     SELECT 1 FROM chunks c WHERE c.chunk_id = i.chunk_id))
                 + (SELECT count(*) FROM {pos} p WHERE p.shard = ANY(%(s)s) AND NOT EXISTS (
                     SELECT 1 FROM chunks c WHERE c.chunk_id = p.chunk_id)),
                 (SELECT count(*) FROM {items} i JOIN chunks c USING (chunk_id)
                     WHERE i.shard = ANY(%(s)s) AND (i.text <> c.text OR i.doc_id <> c.doc_id))"""
        ).format(items=items, pos=pos),
        {"s": shards},
    ).fetchone()
    return CheckResult(
        "rows_match_chunks",
        missing + extra + mismatch,
        {"missing_rows": missing, "unexpected_rows": extra, "text_mismatch": mismatch, "shards": len(shards)},
    )


def no_orphan_rows(conn: psycopg.Connection, gen: Generation, shards: Iterable[int]) -> CheckResult:
    """No serving row or document row whose document is not in the manifest."""
    shards = sorted(set(shards))
    items, docs = schema.items_table(gen.id), schema.docs_table(gen.id)
    orphan_rows, orphan_docs, meta_stale = conn.execute(
        sql.SQL(
            """SELECT
                 (SELECT count(*) FROM {items} i WHERE i.shard = ANY(%(s)s) AND NOT EXISTS (
                     SELECT 1 FROM manifest m WHERE m.doc_id = i.doc_id)),
                 (SELECT count(*) FROM {docs} d WHERE d.shard = ANY(%(s)s) AND NOT EXISTS (
                     SELECT 1 FROM manifest m WHERE m.doc_id = d.doc_id)),
                 (SELECT count(*) FROM {docs} d JOIN manifest m USING (doc_id)
                     WHERE d.shard = ANY(%(s)s) AND d.meta_hash <> m.meta_hash)"""
        ).format(items=items, docs=docs),
        {"s": shards},
    ).fetchone()
    return CheckResult(
        "no_orphan_rows",
        orphan_rows + orphan_docs + meta_stale,
        {"orphan_rows": orphan_rows, "orphan_docs": orphan_docs, "stale_metadata": meta_stale},
    )


def vectors_valid(conn: psycopg.Connection, gen: Generation, shards: Iterable[int]) -> CheckResult:
    """No NULL vector and none of the wrong dimension."""
    shards = sorted(set(shards))
    null, wrong = conn.execute(
        sql.SQL(
            """SELECT count(*) FILTER (WHERE embedding IS NULL),
                      count(*) FILTER (WHERE embedding IS NOT NULL AND vector_dims(embedding) <> %(d)s)
               FROM {items} WHERE shard = ANY(%(s)s)"""
        ).format(items=schema.items_table(gen.id)),
        {"s": shards, "d": gen.dims},
    ).fetchone()
    return CheckResult(
        "vectors_valid", null + wrong, {"null_vectors": null, "wrong_dimension": wrong, "dims": gen.dims}
    )


def manifest_matches_source(
    conn: psycopg.Connection,
    source: Source | None,
    shards: Iterable[int],
    *,
    sample: int = 200,
    seed: int = 0,
) -> CheckResult:
    """Re-read a sample of the shards' documents (files or objects) and compare their hashes with
    the manifest."""
    if source is None:  # no source recorded for this index: nothing to compare against
        return CheckResult("manifest_matches_source", 0, {"checked": 0, "documents": 0, "folder": "none"})
    shards = sorted(set(shards))
    rows = conn.execute(
        "SELECT doc_id, content_hash, meta_hash FROM manifest WHERE shard = ANY(%s) AND source = %s",
        (shards, source.name),
    ).fetchall()
    picked = rows if len(rows) <= sample else random.Random(seed).sample(rows, sample)
    mismatched, unreadable = [], 0
    for doc_id, ch, mh in picked:
        try:
            doc = source.read(doc_id)
        except (DocumentGone, DocumentError):
            unreadable += 1  # deleted or broken since the run: the next refresh handles it
            continue
        if doc.content_hash != ch or doc.meta_hash != mh:
            mismatched.append(doc_id)
    return CheckResult(
        "manifest_matches_source",
        len(mismatched),
        {
            "checked": len(picked),
            "documents": len(rows),
            "mismatched": mismatched[:10],
            "unreadable_now": unreadable,
        },
    )


def serving_checks(conn: psycopg.Connection, gen: Generation, shards: Iterable[int]) -> list[CheckResult]:
    shards = sorted(set(shards))
    return [
        rows_match_chunks(conn, gen, shards),
        no_orphan_rows(conn, gen, shards),
        vectors_valid(conn, gen, shards),
    ]
