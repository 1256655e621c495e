"""Generation lifecycle: create, fill-check, verify, switch, retire, drop, and roll back.

A generation is one set of serving tables (``gN_items``, ``gN_pos``, ``gN_docs``) built with one
embedder and chunker. ``items`` is a view over the live generation's tables; a switch drops and
recreates the view and flips ``generations.state`` in one transaction under ``GEN_LOCK``, so a
reader's statement sees the old or the new generation, never a mix. A new generation is filled
while the old one keeps serving (blue/green) and switched to only once complete and verified.
Retired generations keep their tables (up to ``keep_generations``, live included), which is what
makes :func:`rollback` a switch with nothing to re-embed; older ones are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from rag_assets.store import schema

GEN_LOCK = schema.lock_key("generations")
FINALIZE_LOCK = schema.lock_key("finalize")


@dataclass(frozen=True)
class Generation:
    """One row of ``generations``: a set of serving tables built with one embedder and chunker."""

    id: int
    embedder_id: int
    chunker_version: str
    dims: int
    state: str


class ConsistencyError(RuntimeError):
    """A shard sync would leave serving rows that do not match the chunks; nothing was committed."""


_GEN_COLS = "id, embedder_id, chunker_version, dims, state"


def live_generation(conn: psycopg.Connection) -> Generation | None:
    """The generation readers see now (``live``), or None before the first switch."""
    row = conn.execute(
        f"SELECT {_GEN_COLS} FROM generations WHERE id = (SELECT generation FROM live)"
    ).fetchone()
    return Generation(*row) if row else None


def get_generation(conn: psycopg.Connection, gen_id: int) -> Generation | None:
    """The generation ``gen_id``, or None if there is no such row."""
    row = conn.execute(f"SELECT {_GEN_COLS} FROM generations WHERE id = %s", (gen_id,)).fetchone()
    return Generation(*row) if row else None


def target_generation(
    conn: psycopg.Connection,
    embedder_id: int,
    chunker_version: str,
    dims: int,
    *,
    fresh_token: str | None = None,
    text_search_config: str = schema.DEFAULT_TEXT_SEARCH_CONFIG,
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
        schema.create_generation_tables(conn, gid, dims, text_search_config)
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


def generation_complete(conn: psycopg.Connection, gen: Generation) -> bool:
    """Whether every shard of ``gen`` reflects the current chunks (it may be switched to)."""
    return not lagging_serving_shards(conn, gen)


def finalize_generation(
    conn: psycopg.Connection,
    gen: Generation,
    keep: int = 3,
    *,
    hnsw_m: int = 16,
    hnsw_ef_construction: int = 64,
    hnsw_memory_cap_mb: int = 2048,
    hnsw_workers: int | None = None,
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
            schema.create_vector_index(
                conn, gen.id, hnsw_m, hnsw_ef_construction, hnsw_memory_cap_mb, workers=hnsw_workers
            )
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


class RollbackError(RuntimeError):
    """There is no generation to roll back to (or the switch failed); nothing changed."""


def _has_tables(conn: psycopg.Connection, gen_id: int) -> bool:
    """Whether the tables of a generation still exist (whatever tables the schema module defines)."""
    makers = [getattr(schema, n) for n in ("items_table", "pos_table", "docs_table") if hasattr(schema, n)]
    names = [m(gen_id).as_string(conn) for m in makers]
    row = conn.execute(
        "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest(%s::text[]) n", (names,)
    ).fetchone()
    return bool(row[0])


def list_generations(conn: psycopg.Connection) -> list[dict]:
    """Every generation with its state, embedder, whether its tables exist, and an approximate size."""
    rows = conn.execute(
        """SELECT g.id, g.state, g.origin, e.fingerprint, g.dims, g.chunker_version, g.created_at,
                  g.live_since, g.retired_at,
                  (SELECT c.reltuples::bigint FROM pg_class c WHERE c.oid = to_regclass(format('g%s_items', g.id))),
                  g.id = (SELECT generation FROM live)
           FROM generations g JOIN rag_cache.embedders e ON e.id = g.embedder_id
           ORDER BY g.id"""
    ).fetchall()
    target = _rollback_target(conn)
    return [
        {
            "id": r[0],
            "state": r[1],
            "origin": r[2],
            "embedder": r[3],
            "dims": r[4],
            "chunker_version": r[5],
            "created_at": r[6].isoformat() if r[6] else None,
            "live_since": r[7].isoformat() if r[7] else None,
            "retired_at": r[8].isoformat() if r[8] else None,
            "tables": _has_tables(conn, r[0]),
            "rows_estimate": int(r[9]) if r[9] is not None and r[9] >= 0 else None,
            "live": bool(r[10]),
            "rollback_target": r[0] == target,
        }
        for r in rows
    ]


def _rollback_target(conn: psycopg.Connection) -> int | None:
    """The most recently retired generation whose tables still exist."""
    rows = conn.execute(
        """SELECT g.id FROM generations g
           WHERE g.state = 'retired' AND g.id IS DISTINCT FROM (SELECT generation FROM live)
           ORDER BY g.retired_at DESC NULLS LAST, g.id DESC"""
    ).fetchall()
    for (gid,) in rows:
        if _has_tables(conn, gid):
            return gid
    return None


def rollback(conn: psycopg.Connection, keep_generations: int = 3) -> dict:
    """Switch live back to the most recently retired generation whose tables still exist.

    Nothing is re-embedded: the old tables (rows, vectors and HNSW index) are still there, and the
    switch is the same one-transaction view swap as a normal switch, so readers see the old or
    the new index, never a mix. Calling it again switches forward again. The bookkeeping is not
    rewound: the next refresh (with the settings that built the now-live generation) brings the
    generation up to the current sources, re-using the embedding cache.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RollbackError("rollback needs a connection with no open transaction")
    t0 = time.perf_counter()
    with conn.transaction():
        conn.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(GEN_LOCK))
        live = live_generation(conn)
        if live is None:
            raise RollbackError("nothing to roll back: the index has no live generation")
        target = _rollback_target(conn)
        if target is None:
            raise RollbackError(
                f"no previous generation to roll back to: generation {live.id} is live and no retired "
                "generation still has its tables (raise RAG_KEEP_GENERATIONS to keep more, or restore a snapshot)"
            )
        t_switch = time.perf_counter()
        switch_live(conn, target)
    switch_s = time.perf_counter() - t_switch
    total_s = time.perf_counter() - t0
    dropped = retire_old_generations(conn, max(2, keep_generations))
    gen = get_generation(conn, target)
    fp = conn.execute("SELECT fingerprint FROM rag_cache.embedders WHERE id = %s", (gen.embedder_id,)).fetchone()[0]
    return {
        "from_generation": live.id,
        "to_generation": target,
        "embedder": fp,
        "chunker_version": gen.chunker_version,
        "switch_ms": round(switch_s * 1000, 3),
        "total_ms": round(total_s * 1000, 3),
        "generations_dropped": dropped,
    }
