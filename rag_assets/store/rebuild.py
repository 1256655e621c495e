"""The rebuild path of a refresh: measure the sync's work, and start a new generation as a copy of the live one.

A refresh that would insert many rows into the live HNSW graph one by one may instead copy the live
generation's rows inside Postgres into new, unindexed tables (``INSERT ... SELECT``: no vector leaves
the server, none is recomputed), let the ordinary shard sync apply the delta there, build the HNSW
graph once and switch (``generations.finalize_generation``). Which way is chosen is
``rag_assets/sync_cost.py``; this module holds the SQL.

The copy is one transaction under the generation lock and every shard lock: afterwards the new
generation holds exactly the live rows and the live per-shard sync versions (so the shards with no
change count as synced, the changed ones as lagging), or, after a crash, it does not exist at all.
A crash later (during the delta sync or the HNSW build) leaves a complete-or-lagging *building*
generation of the live configuration, which ``target_generation`` hands to the next run of any path
to finish: readers keep the old generation until the switch.
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
from psycopg import sql

from rag_assets.store import schema
from rag_assets.store.db import lock_shards
from rag_assets.store.generations import GEN_LOCK, Generation, lagging_serving_shards
from rag_assets.sync_cost import SyncWork

# The origin of a generation started by a refresh's rebuild path (``generations.origin``).
ORIGIN_PREFIX = "sync:"
# In the copy statements, so a test (or an operator) can find them in pg_stat_activity.
COPY_MARK = "/* rag_assets: rebuild copy */"


def measure_sync_work(conn: psycopg.Connection, gen: Generation, shards: Iterable[int] | None = None) -> SyncWork:
    """What syncing the lagging shards (of ``shards``, default all) into ``gen`` would write.

    Exact counts by anti-join on the chunk ids (indexed on both sides): milliseconds to a few
    hundred for a large index, small beside either path.
    """
    lagging = sorted(lagging_serving_shards(conn, gen, shards))
    items = schema.items_table(gen.id)
    row = conn.execute(
        sql.SQL(
            """SELECT (SELECT count(*) FROM {items}),
                      (SELECT count(*) FROM chunks c WHERE c.shard = ANY(%(s)s) AND NOT EXISTS (
                           SELECT 1 FROM {items} i WHERE i.chunk_id = c.chunk_id)),
                      (SELECT count(*) FROM {items} x WHERE x.shard = ANY(%(s)s) AND NOT EXISTS (
                           SELECT 1 FROM chunks c WHERE c.chunk_id = x.chunk_id)),
                      (SELECT count(*) FROM chunks)"""
        ).format(items=items),
        {"s": lagging},
    ).fetchone()
    return SyncWork(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def start_rebuild(
    conn: psycopg.Connection,
    live: Generation,
    run_id: str,
    text_search_config: str = schema.DEFAULT_TEXT_SEARCH_CONFIG,
) -> Generation:
    """A new *building* generation of ``live``'s configuration holding a copy of its rows.

    If a building generation of that configuration already exists (another writer started one),
    that one is returned instead: there is never more than one.
    """
    with conn.transaction():
        conn.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(GEN_LOCK))
        row = conn.execute(
            """SELECT id, embedder_id, chunker_version, dims, state FROM generations
               WHERE state = 'building' AND embedder_id = %s AND chunker_version = %s AND dims = %s
               ORDER BY id DESC LIMIT 1""",
            (live.embedder_id, live.chunker_version, live.dims),
        ).fetchone()
        if row is not None:
            return Generation(*row)
        shards = [r[0] for r in conn.execute("SELECT shard FROM shard_state ORDER BY shard").fetchall()]
        lock_shards(conn, shards)  # no shard sync may commit into the live generation during the copy
        gid = conn.execute(
            """INSERT INTO generations (embedder_id, chunker_version, dims, state, origin)
               VALUES (%s, %s, %s, 'building', %s) RETURNING id""",
            (live.embedder_id, live.chunker_version, live.dims, ORIGIN_PREFIX + run_id),
        ).fetchone()[0]
        schema.create_generation_tables(conn, gid, live.dims, text_search_config, indexes=False)
        # Only rows that are still current: a chunk id names one text in one document (chunks'
        # identity, decision 4), so its row and vector are still right; the sync of the lagging
        # shards then only adds new rows and rewrites moved positions and changed metadata.
        copies = (
            (schema.items_table, "chunk_id, doc_id, shard, chunk_hash, text, embedding", "chunks", "chunk_id"),
            (schema.pos_table, "chunk_id, doc_id, shard, seq", "chunks", "chunk_id"),
            (schema.docs_table, "doc_id, shard, meta_hash, metadata", "chunk_docs", "doc_id"),
        )
        for table, cols, current, key in copies:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {new} ({cols}) SELECT {cols} FROM {old} x WHERE EXISTS ("
                    "SELECT 1 FROM {current} c WHERE c.{key} = x.{key}) " + COPY_MARK
                ).format(
                    new=table(gid),
                    old=table(live.id),
                    cols=sql.SQL(cols),
                    current=sql.Identifier(current),
                    key=sql.Identifier(key),
                )
            )
        schema.create_generation_indexes(conn, gid)
        conn.execute(
            """INSERT INTO generation_shards (generation, shard, chunks_version)
               SELECT %s, shard, chunks_version FROM generation_shards WHERE generation = %s""",
            (gid, live.id),
        )
        for table, *_ in copies:  # the delta sync's anti-joins need real statistics
            conn.execute(sql.SQL("ANALYZE {}").format(table(gid)))
        return Generation(gid, live.embedder_id, live.chunker_version, live.dims, "building")


def is_rebuild_of_live(conn: psycopg.Connection, gen_id: int) -> bool:
    """Whether generation ``gen_id`` was started by a refresh's rebuild path (same configuration as
    the live one: the quality gate, which compares models or chunkers, has nothing to judge)."""
    row = conn.execute("SELECT origin FROM generations WHERE id = %s", (gen_id,)).fetchone()
    return bool(row) and str(row[0]).startswith(ORIGIN_PREFIX)
