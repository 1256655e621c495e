"""Serving generations: the embed-and-sync stage, generation switches, and the index digest.

A shard is synced in one transaction: afterwards its rows in the target generation are exactly
the chunks of its current documents (checked by count before commit). Vectors come from the
embedding cache through ``INSERT … SELECT`` inside the server, so they never travel back to the
client; the cache itself is filled by binary COPY.
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

GEN_LOCK = schema.lock_key("generations")
FINALIZE_LOCK = schema.lock_key("finalize")


@dataclass(frozen=True)
class Generation:
    id: int
    embedder_id: int
    chunker_version: str
    dims: int
    state: str


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


class ConsistencyError(RuntimeError):
    """A shard sync would leave serving rows that do not match the chunks; nothing was committed."""


_GEN_COLS = "id, embedder_id, chunker_version, dims, state"


def live_generation(conn: psycopg.Connection) -> Generation | None:
    row = conn.execute(
        f"SELECT {_GEN_COLS} FROM generations WHERE id = (SELECT generation FROM live)"
    ).fetchone()
    return Generation(*row) if row else None


def get_generation(conn: psycopg.Connection, gen_id: int) -> Generation | None:
    row = conn.execute(f"SELECT {_GEN_COLS} FROM generations WHERE id = %s", (gen_id,)).fetchone()
    return Generation(*row) if row else None


def target_generation(
    conn: psycopg.Connection,
    embedder_id: int,
    chunker_version: str,
    dims: int,
    *,
    fresh_token: str | None = None,
) -> Generation:
    """The generation this run writes into.

    The live one when it was built with the same embedder and chunker (plain incremental run);
    otherwise a *building* generation for the new fingerprint, filled while the old one keeps
    serving (blue/green), and switched to when complete. ``fresh_token`` asks for a new generation
    for one full rebuild (``--full``, or a full-reindex backfill): every run of that rebuild passes
    the same token (the backfill id) and so writes into the same new generation.
    """
    with conn.transaction():
        conn.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(GEN_LOCK))
        if fresh_token is None:
            # A building generation of this configuration comes first, even when the live one has the
            # same configuration: it is a rebuild (``--full``, a full-reindex backfill) that was
            # interrupted, possibly between its last shard sync and the switch. Writing into it and
            # finishing it is the only way it ever completes; left alone it would stay "building".
            row = conn.execute(
                f"""SELECT {_GEN_COLS} FROM generations WHERE state = 'building' AND embedder_id = %s
                    AND chunker_version = %s AND dims = %s ORDER BY id DESC LIMIT 1""",
                (embedder_id, chunker_version, dims),
            ).fetchone()
            live = live_generation(conn)
            if (
                row is None
                and live is not None
                and live.embedder_id == embedder_id
                and live.chunker_version == chunker_version
                and live.dims == dims
            ):
                return live
        else:
            row = conn.execute(
                f"SELECT {_GEN_COLS} FROM generations WHERE origin = %s AND embedder_id = %s"
                " AND chunker_version = %s AND dims = %s ORDER BY id DESC LIMIT 1",
                (fresh_token, embedder_id, chunker_version, dims),
            ).fetchone()
        if row:
            return Generation(*row)
        # Abandon older building generations: their tables are dropped, their ids kept for history.
        for (old,) in conn.execute("SELECT id FROM generations WHERE state = 'building'").fetchall():
            schema.drop_generation_tables(conn, old)
            conn.execute("UPDATE generations SET state = 'dropped' WHERE id = %s", (old,))
        gid = conn.execute(
            """INSERT INTO generations (embedder_id, chunker_version, dims, state, origin)
               VALUES (%s, %s, %s, 'building', %s) RETURNING id""",
            (embedder_id, chunker_version, dims, fresh_token or "index"),
        ).fetchone()[0]
        schema.create_generation_tables(conn, gid, dims)
        return Generation(gid, embedder_id, chunker_version, dims, "building")


def lagging_serving_shards(
    conn: psycopg.Connection, gen: Generation, shards: Iterable[int] | None = None
) -> set[int]:
    """Shards whose rows in ``gen`` do not reflect the current chunks."""
    q = """SELECT s.shard FROM shard_state s
           LEFT JOIN generation_shards g ON g.generation = %s AND g.shard = s.shard
           WHERE g.chunks_version IS DISTINCT FROM s.chunks_version"""
    params: list = [gen.id]
    if shards is not None:
        q += " AND s.shard = ANY(%s)"
        params.append(sorted(set(shards)))
    return {r[0] for r in conn.execute(q, params).fetchall()}


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


def generation_complete(conn: psycopg.Connection, gen: Generation) -> bool:
    return not lagging_serving_shards(conn, gen)


def finalize_generation(
    conn: psycopg.Connection,
    gen: Generation,
    keep: int = 3,
    *,
    hnsw_m: int = 16,
    hnsw_ef_construction: int = 64,
    hnsw_memory_cap_mb: int = 2048,
) -> bool:
    """If ``gen`` is a complete building generation: index it, verify it, and switch to it."""
    conn.execute(sql.SQL("SELECT pg_advisory_lock({})").format(FINALIZE_LOCK))
    try:
        if not conn.autocommit:
            conn.commit()
        current = get_generation(conn, gen.id)
        if current is None or current.state != "building" or not generation_complete(conn, current):
            return False
        with conn.transaction():
            schema.create_vector_index(conn, gen.id, hnsw_m, hnsw_ef_construction, hnsw_memory_cap_mb)
        with conn.transaction():
            for t in (schema.items_table(gen.id), schema.pos_table(gen.id)):
                conn.execute(sql.SQL("ANALYZE {}").format(t))
            conn.execute(sql.SQL("ANALYZE {}").format(schema.docs_table(gen.id)))
        verify_generation(conn, current)
        switch_live(conn, gen.id)
        retire_old_generations(conn, keep)
        return True
    finally:
        conn.execute(sql.SQL("SELECT pg_advisory_unlock({})").format(FINALIZE_LOCK))
        if not conn.autocommit:
            conn.commit()


def verify_generation(conn: psycopg.Connection, gen: Generation) -> None:
    """The generation holds exactly the current chunks and documents (run before a switch)."""
    items, pos, docs = schema.items_table(gen.id), schema.pos_table(gen.id), schema.docs_table(gen.id)
    n_items, n_pos, n_chunks, n_docs, n_cdocs = conn.execute(
        sql.SQL(
            """SELECT (SELECT count(*) FROM {items}), (SELECT count(*) FROM {pos}), (SELECT count(*) FROM chunks),
                      (SELECT count(*) FROM {docs}), (SELECT count(*) FROM chunk_docs)"""
        ).format(items=items, pos=pos, docs=docs)
    ).fetchone()
    if not n_items == n_pos == n_chunks or n_docs != n_cdocs:
        raise ConsistencyError(
            f"generation {gen.id} has {n_items} rows / {n_docs} documents but the chunk state has "
            f"{n_chunks} chunks / {n_cdocs} documents; not switching"
        )


def switch_live(conn: psycopg.Connection, gen_id: int) -> float:
    """Point readers at ``gen_id`` in one transaction. Returns the seconds the switch took."""
    t0 = time.perf_counter()
    with conn.transaction():
        conn.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(GEN_LOCK))
        conn.execute("DROP VIEW IF EXISTS items")
        schema.point_view_at(conn, gen_id)
        conn.execute(
            "UPDATE generations SET state = 'retired', retired_at = now() WHERE state = 'live' AND id <> %s",
            (gen_id,),
        )
        conn.execute(
            "UPDATE generations SET state = 'live', live_since = now(), retired_at = NULL WHERE id = %s",
            (gen_id,),
        )
        conn.execute(
            """INSERT INTO live (singleton, generation) VALUES (true, %s)
               ON CONFLICT (singleton) DO UPDATE SET generation = EXCLUDED.generation, switched_at = now()""",
            (gen_id,),
        )
    return time.perf_counter() - t0


def retire_old_generations(conn: psycopg.Connection, keep: int) -> list[int]:
    """Drop the tables of retired generations beyond the ``keep`` most recent (live included)."""
    rows = conn.execute(
        "SELECT id FROM generations WHERE state IN ('live', 'retired') ORDER BY coalesce(live_since, created_at) DESC, id DESC"
    ).fetchall()
    dropped = []
    with conn.transaction():
        for (gid,) in rows[keep:]:
            schema.drop_generation_tables(conn, gid)
            conn.execute("UPDATE generations SET state = 'dropped' WHERE id = %s", (gid,))
            dropped.append(gid)
    return dropped


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
