"""The consistency audit: compare what the index *is* with what it *should be*, and repair drift.

The stages keep per-shard version stamps, so a shard is normally in step by construction. The audit
does not trust those stamps: it compares contents (manifest ↔ chunk state ↔ serving rows ↔ cached
vectors) and repairs any shard that differs — rows deleted or edited by hand, a bad restore, a
cache pruned under a live index — then proves the repair by re-checking. This is the "verify and
repair pass against the real store" that LangChain's record manager lacks (langchain#39937).
"""

from __future__ import annotations

import time

import psycopg
from psycopg import sql

from rag_assets.pipeline import StageContext, chunk_stage, embed_stage
from rag_assets.store import schema
from rag_assets.store.serving import live_generation


def _by_shard(conn: psycopg.Connection, query: sql.Composable | str, params: dict) -> dict[int, int]:
    return {int(s): int(n) for s, n in conn.execute(query, params).fetchall()}


def find_drift(conn: psycopg.Connection, chunker_version: str) -> dict[str, dict[int, int]]:
    """Per kind of drift, the number of offending rows per shard."""
    gen = live_generation(conn)
    out: dict[str, dict[int, int]] = {}
    out["chunk_state_stale"] = _by_shard(
        conn,
        """SELECT coalesce(m.shard, c.shard), count(*) FROM manifest m
           FULL JOIN chunk_docs c ON c.doc_id = m.doc_id
           WHERE m.doc_id IS NULL OR c.doc_id IS NULL OR m.content_hash <> c.content_hash
              OR m.meta_hash <> c.meta_hash OR c.chunker_version <> %(cv)s
           GROUP BY 1""",
        {"cv": chunker_version},
    )
    if gen is None:
        return out
    items, pos, docs = schema.items_table(gen.id), schema.pos_table(gen.id), schema.docs_table(gen.id)
    out["rows_missing"] = _by_shard(
        conn,
        sql.SQL(
            """SELECT c.shard, count(*) FROM chunks c WHERE
                   NOT EXISTS (SELECT 1 FROM {items} i WHERE i.chunk_id = c.chunk_id)
                   OR NOT EXISTS (SELECT 1 FROM {pos} p WHERE p.chunk_id = c.chunk_id) GROUP BY 1"""
        ).format(items=items, pos=pos),
        {},
    )
    orphans = [
        _by_shard(
            conn,
            sql.SQL(
                """SELECT x.shard, count(*) FROM {t} x WHERE NOT EXISTS (
                       SELECT 1 FROM chunks c WHERE c.chunk_id = x.chunk_id) GROUP BY 1"""
            ).format(t=t),
            {},
        )
        for t in (items, pos)
    ]
    out["rows_orphaned"] = {
        s: orphans[0].get(s, 0) + orphans[1].get(s, 0) for s in {*orphans[0], *orphans[1]}
    }
    stale = _by_shard(
        conn,
        sql.SQL(
            """SELECT i.shard, count(*) FROM {items} i JOIN chunks c USING (chunk_id)
               LEFT JOIN rag_cache.embedding_cache e ON e.embedder_id = %(eid)s AND e.chunk_hash = c.chunk_hash
               WHERE i.chunk_hash <> c.chunk_hash OR i.text <> c.text OR i.shard <> c.shard
                  OR i.doc_id <> c.doc_id OR e.embedding IS NULL OR i.embedding <> e.embedding
               GROUP BY 1"""
        ).format(items=items),
        {"eid": gen.embedder_id},
    )
    moved = _by_shard(
        conn,
        sql.SQL(
            """SELECT p.shard, count(*) FROM {pos} p JOIN chunks c USING (chunk_id)
               WHERE p.seq <> c.seq OR p.doc_id <> c.doc_id OR p.shard <> c.shard GROUP BY 1"""
        ).format(pos=pos),
        {},
    )
    out["rows_stale"] = {s: stale.get(s, 0) + moved.get(s, 0) for s in {*stale, *moved}}
    out["docs_drift"] = _by_shard(
        conn,
        sql.SQL(
            """SELECT coalesce(d.shard, c.shard), count(*) FROM {docs} d
               FULL JOIN chunk_docs c ON c.doc_id = d.doc_id
               WHERE d.doc_id IS NULL OR c.doc_id IS NULL OR d.meta_hash <> c.meta_hash
                  OR d.metadata <> c.metadata
               GROUP BY 1"""
        ).format(docs=docs),
        {},
    )
    return out


def audit(ctx: StageContext, *, repair: bool = True) -> dict:
    """Find drift; with ``repair``, re-derive the affected shards and verify they are clean."""
    t0 = time.perf_counter()
    conn = ctx.conn
    drift = find_drift(conn, ctx.chunker.version)
    found = {k: sum(v.values()) for k, v in drift.items()}
    shards = sorted({s for v in drift.values() for s in v})
    report: dict = {"found": found, "shards_affected": shards, "repaired": False}
    gen = live_generation(conn)
    if gen is not None and gen.embedder_id != ctx.embedder_id:
        report["note"] = (
            "the live generation was built with another embedder than the configured one; not repairing"
        )
        repair = False
    if repair and shards and gen is not None:
        chunk_shards = sorted(drift.get("chunk_state_stale", {}))
        if chunk_shards:
            chunk_stage(ctx, chunk_shards, force=True)
        _drop_drifted_rows(conn, gen.id, ctx, shards)
        embed_stage(ctx, shards, gen=gen, force=True, finalize=False)
        after = find_drift(conn, ctx.chunker.version)
        report["remaining"] = {k: sum(v.values()) for k, v in after.items()}
        report["repaired"] = not any(report["remaining"].values())
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _drop_drifted_rows(conn: psycopg.Connection, gen_id: int, ctx: StageContext, shards: list[int]) -> None:
    """Delete serving rows whose content differs from the chunks/cache, so the sync re-inserts them."""
    items = schema.items_table(gen_id)
    with conn.transaction():
        conn.execute(
            sql.SQL(
                """DELETE FROM {items} i USING chunks c
                   WHERE i.shard = ANY(%(s)s) AND c.chunk_id = i.chunk_id AND (
                       i.text <> c.text OR i.shard <> c.shard OR i.doc_id <> c.doc_id OR NOT EXISTS (
                           SELECT 1 FROM rag_cache.embedding_cache e WHERE e.embedder_id = %(eid)s
                           AND e.chunk_hash = c.chunk_hash AND e.embedding = i.embedding))"""
            ).format(items=items),
            {"s": shards, "eid": ctx.embedder_id},
        )
        pos = schema.pos_table(gen_id)
        conn.execute(
            sql.SQL(
                """DELETE FROM {pos} p USING chunks c WHERE p.shard = ANY(%(s)s) AND c.chunk_id = p.chunk_id
                   AND (p.doc_id <> c.doc_id OR p.shard <> c.shard)"""
            ).format(pos=pos),
            {"s": shards},
        )
        docs = schema.docs_table(gen_id)
        conn.execute(
            sql.SQL(
                """UPDATE {docs} d SET metadata = c.metadata, meta_hash = c.meta_hash FROM chunk_docs c
                   WHERE c.doc_id = d.doc_id AND d.shard = ANY(%(s)s) AND d.metadata <> c.metadata"""
            ).format(docs=docs),
            {"s": shards},
        )
