"""What ``rag-assets status`` reports: counts, generations, the last run and the index digest."""

from __future__ import annotations

import psycopg

from rag_assets.store.serving import index_digest, live_generation


def index_status(conn: psycopg.Connection, *, digest: bool = True) -> dict:
    docs, chunks, cache = conn.execute(
        "SELECT (SELECT count(*) FROM manifest), (SELECT count(*) FROM chunks),"
        " (SELECT count(*) FROM rag_cache.embedding_cache)"
    ).fetchone()
    live = live_generation(conn)
    rows = 0
    embedder = None
    if live is not None:
        rows = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        embedder = conn.execute(
            "SELECT fingerprint FROM rag_cache.embedders WHERE id = %s", (live.embedder_id,)
        ).fetchone()[0]
    gens = [
        {"id": g, "state": s, "created_at": c, "live_since": ls}
        for g, s, c, ls in conn.execute(
            "SELECT id, state, created_at, live_since FROM generations WHERE state <> 'dropped' ORDER BY id"
        ).fetchall()
    ]
    last = conn.execute(
        "SELECT kind, started_at, finished_at, stats FROM runs ORDER BY id DESC LIMIT 1"
    ).fetchone()
    last_run = None
    if last:
        s = last[3]
        last_run = {
            "kind": last[0],
            "started_at": last[1],
            "finished_at": last[2],
            **{
                k: s.get(k)
                for k in (
                    "docs_added",
                    "docs_modified",
                    "docs_metadata_only",
                    "docs_deleted",
                    "chunks_embedded",
                    "tokens_embedded",
                    "shards_refreshed",
                    "seconds",
                )
            },
        }
    lagging = conn.execute(
        "SELECT count(*) FROM shard_state s LEFT JOIN generation_shards g "
        "ON g.generation = (SELECT generation FROM live) AND g.shard = s.shard "
        "WHERE g.chunks_version IS DISTINCT FROM s.chunks_version"
    ).fetchone()[0]
    out = {
        "documents": docs,
        "chunks": chunks,
        "serving_rows": rows,
        "cached_embeddings": cache,
        "live_generation": live.id if live else None,
        "embedder": embedder,
        "chunker": live.chunker_version if live else None,
        "shards_behind": lagging,
        "generations": gens,
        "last_run": last_run,
    }
    if digest:
        out["index_digest"] = index_digest(conn) if live else None
    return out
