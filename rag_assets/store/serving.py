"""The embed-and-sync stage of the serving rows, and the index digest that proves two indexes equal.

A shard is synced in one transaction: afterwards its rows in the target generation are exactly
the chunks of its current documents (checked by count before commit). Vectors come from the
embedding cache through ``INSERT … SELECT`` inside the server, so they never travel back to the
client; the cache itself is filled by binary COPY. Which generation a run writes into, and the
switches between generations, are :mod:`rag_assets.store.generations`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from rag_assets.embedders.base import Embedder, EmbedStats
from rag_assets.embedders.cache import fill_cache, find_misses
from rag_assets.store import schema
from rag_assets.store.db import analyze_if_changed, lock_shards

# Generation lifecycle names used to live here; they stay importable from this module for code
# (and parallel branches) that imports them from ``rag_assets.store.serving``.
from rag_assets.store.generations import (
    _GEN_COLS,
    FINALIZE_LOCK,
    GEN_LOCK,
    ConsistencyError,
    Generation,
    finalize_generation,
    generation_complete,
    get_generation,
    lagging_serving_shards,
    live_generation,
    retire_old_generations,
    switch_live,
    target_generation,
    verify_generation,
)

__all__ = [
    "FINALIZE_LOCK",
    "GEN_LOCK",
    "_GEN_COLS",
    "ConsistencyError",
    "Generation",
    "ServingStats",
    "combine_digests",
    "finalize_generation",
    "generation_complete",
    "get_generation",
    "index_digest",
    "lagging_serving_shards",
    "live_generation",
    "retire_old_generations",
    "shard_digests",
    "switch_live",
    "sync_serving",
    "target_generation",
    "verify_generation",
]


@dataclass
class ServingStats:
    shards: int = 0
    chunks_embedded: int = 0
    tokens_embedded: int = 0
    chunks_reused: int = 0
    tokens_reused: int = 0
    rows_written: int = 0
    rows_deleted: int = 0
    rows_moved: int = 0
    docs_meta_written: int = 0
    doc_rows_deleted: int = 0
    seconds_sync: float = 0.0

    def add(self, o: ServingStats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(o, k))


def sync_serving(
    conn: psycopg.Connection,
    shards: Iterable[int],
    gen: Generation,
    embedder: Embedder,
    embedder_id: int,
    estats: EmbedStats,
    *,
    force: bool = False,
    progress=None,
) -> ServingStats:
    """Embed what the cache lacks, then make ``gen``'s rows for ``shards`` equal the chunks."""
    out = ServingStats()
    shards = sorted(set(shards))
    todo = sorted(lagging_serving_shards(conn, gen, shards)) if not force else shards
    if not todo:
        return out
    out.shards = len(todo)
    for _attempt in range(5):
        misses = find_misses(conn, embedder_id, todo)
        if misses:
            tokens_before = estats.tokens
            fill_cache(conn, embedder, embedder_id, misses, estats, progress=progress)
            out.chunks_embedded += len(misses)
            out.tokens_embedded += estats.tokens - tokens_before
            analyze_if_changed(conn, "rag_cache.embedding_cache", len(misses))
        embedded_now = [m.chunk_hash for m in misses]
        t0 = time.perf_counter()
        try:
            _sync_rows(conn, todo, gen, embedder_id, embedded_now, out)
        except _CacheRace:
            continue  # chunks changed under us and need vectors: embed those, then retry
        analyze_if_changed(
            conn, schema.items_table(gen.id).as_string(conn), out.rows_written + out.rows_deleted
        )
        out.seconds_sync += time.perf_counter() - t0
        return out
    raise ConsistencyError(f"shards {todo}: chunks kept changing during the sync; retry the run")


class _CacheRace(Exception):
    pass


def _sync_rows(
    conn: psycopg.Connection,
    shards: list[int],
    gen: Generation,
    embedder_id: int,
    embedded_now: list[str],
    out: ServingStats,
) -> None:
    items, pos, docs = schema.items_table(gen.id), schema.pos_table(gen.id), schema.docs_table(gen.id)
    with conn.transaction(), conn.cursor() as cur:
        lock_shards(cur.connection, shards)
        cur.execute(
            """SELECT count(*) FROM chunks c WHERE c.shard = ANY(%s) AND NOT EXISTS (
                   SELECT 1 FROM rag_cache.embedding_cache e WHERE e.embedder_id = %s AND e.chunk_hash = c.chunk_hash)""",
            (shards, embedder_id),
        )
        if cur.fetchone()[0]:
            raise _CacheRace
        for table in (items, pos):
            cur.execute(
                sql.SQL(
                    """DELETE FROM {t} x WHERE x.shard = ANY(%s) AND NOT EXISTS (
                           SELECT 1 FROM chunks c WHERE c.chunk_id = x.chunk_id)"""
                ).format(t=table),
                (shards,),
            )
            if table is items:
                out.rows_deleted += cur.rowcount
        cur.execute(  # positions: new chunks, and chunks that only moved within their document
            sql.SQL(
                """WITH up AS (
                       INSERT INTO {pos} (chunk_id, doc_id, shard, seq)
                       SELECT chunk_id, doc_id, shard, seq FROM chunks WHERE shard = ANY(%s)
                       ON CONFLICT (chunk_id) DO UPDATE SET seq = EXCLUDED.seq WHERE {pos}.seq <> EXCLUDED.seq
                       RETURNING (xmax = 0) AS inserted)
                   SELECT count(*) FILTER (WHERE NOT inserted) FROM up"""
            ).format(pos=pos),
            (shards,),
        )
        out.rows_moved += cur.fetchone()[0]
        cur.execute(
            sql.SQL(
                """WITH ins AS (
                       INSERT INTO {items} (chunk_id, doc_id, shard, chunk_hash, text, embedding)
                       SELECT c.chunk_id, c.doc_id, c.shard, c.chunk_hash, c.text, e.embedding
                       FROM chunks c
                       JOIN rag_cache.embedding_cache e ON e.embedder_id = %s AND e.chunk_hash = c.chunk_hash
                       WHERE c.shard = ANY(%s) AND NOT EXISTS (
                           SELECT 1 FROM {items} i WHERE i.chunk_id = c.chunk_id)
                       RETURNING chunk_hash)
                   SELECT count(*),
                          count(*) FILTER (WHERE NOT (ins.chunk_hash = ANY(%s))),
                          coalesce(sum(e.n_tokens) FILTER (WHERE NOT (ins.chunk_hash = ANY(%s))), 0)
                   FROM ins JOIN rag_cache.embedding_cache e ON e.embedder_id = %s AND e.chunk_hash = ins.chunk_hash"""
            ).format(items=items),
            (embedder_id, shards, embedded_now, embedded_now, embedder_id),
        )
        written, reused, reused_tokens = cur.fetchone()
        out.rows_written += written
        out.chunks_reused += reused
        out.tokens_reused += int(reused_tokens)
        cur.execute(
            sql.SQL(
                """SELECT (SELECT count(*) FROM chunks WHERE shard = ANY(%s)),
                          (SELECT count(*) FROM {items} WHERE shard = ANY(%s)),
                          (SELECT count(*) FROM {pos} WHERE shard = ANY(%s))"""
            ).format(items=items, pos=pos),
            (shards, shards, shards),
        )
        n_chunks, n_rows, n_pos = cur.fetchone()
        if not n_chunks == n_rows == n_pos:
            raise ConsistencyError(
                f"shards {shards}: {n_rows} serving rows and {n_pos} positions for {n_chunks} chunks "
                "after sync; rolled back"
            )
        cur.execute(
            sql.SQL(
                """DELETE FROM {docs} d WHERE d.shard = ANY(%s) AND NOT EXISTS (
                       SELECT 1 FROM chunk_docs c WHERE c.doc_id = d.doc_id)"""
            ).format(docs=docs),
            (shards,),
        )
        out.doc_rows_deleted += cur.rowcount
        cur.execute(
            sql.SQL(
                """INSERT INTO {docs} (doc_id, shard, meta_hash, metadata)
                   SELECT doc_id, shard, meta_hash, metadata FROM chunk_docs WHERE shard = ANY(%s)
                   ON CONFLICT (doc_id) DO UPDATE SET shard = EXCLUDED.shard, meta_hash = EXCLUDED.meta_hash,
                       metadata = EXCLUDED.metadata
                   WHERE {docs}.meta_hash <> EXCLUDED.meta_hash OR {docs}.shard <> EXCLUDED.shard"""
            ).format(docs=docs),
            (shards,),
        )
        out.docs_meta_written += cur.rowcount
        cur.execute(
            """INSERT INTO generation_shards (generation, shard, chunks_version)
               SELECT %s, shard, chunks_version FROM shard_state WHERE shard = ANY(%s)
               ON CONFLICT (generation, shard) DO UPDATE SET chunks_version = EXCLUDED.chunks_version,
                   synced_at = now()""",
            (gen.id, shards),
        )


def shard_digests(conn: psycopg.Connection, gen_id: int | None = None) -> dict[int, str]:
    """Per-shard digest of the serving rows (doc_id, seq, text, metadata, embedding)."""
    if gen_id is None:
        live = live_generation(conn)
        if live is None:
            return {}
        gen_id = live.id
    rows = conn.execute(
        sql.SQL(
            """SELECT r.shard, md5(string_agg(
                   md5(r.doc_id) || ':' || r.seq || ':' || md5(r.text) || ':' || md5(r.metadata::text)
                   || ':' || md5(r.embedding::text), ',' ORDER BY r.doc_id, r.seq))
               FROM ({rows}) r GROUP BY r.shard"""
        ).format(rows=schema.serving_rows_sql(gen_id))
    ).fetchall()
    return {int(s): d for s, d in rows}


def combine_digests(digests: dict[int, str]) -> str:
    h = hashlib.sha256()
    for s in sorted(digests):
        h.update(f"{s}:{digests[s]}\n".encode())
    return h.hexdigest()


def index_digest(conn: psycopg.Connection, gen_id: int | None = None) -> str:
    """Deterministic digest of an index: equal for equal rows, whatever history built them."""
    return combine_digests(shard_digests(conn, gen_id))
