"""The embedding cache in Postgres, keyed by (embedder fingerprint, chunk_hash).

Only texts never embedded under the current fingerprint reach the provider. New vectors are
committed batch by batch *before* the serving rows are touched: they are content-addressed, so a
crash or an error mid-run loses no paid-for embedding and the next run resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import psycopg

from rag_assets.embedders.base import Embedder, EmbedStats, check_recorded_dims, check_vectors


@dataclass(frozen=True, slots=True)
class Miss:
    chunk_hash: str
    text: str
    label: str  # "doc_id#seq" of one chunk with this text, for error messages
    n_tokens: int


def ensure_embedder(conn: psycopg.Connection, embedder: Embedder) -> int:
    """The id of the embedder's fingerprint row (created on first use).

    A fingerprint with "native" dimensions does not pin the vector size: the size the provider
    returns now must be the size recorded for it, or nothing is written (``check_recorded_dims``).
    """
    row = conn.execute(
        """INSERT INTO rag_cache.embedders (fingerprint, provider, model, dims) VALUES (%s, %s, %s, %s)
           ON CONFLICT (fingerprint) DO UPDATE SET dims = rag_cache.embedders.dims RETURNING id, dims""",
        (embedder.fingerprint, embedder.provider, embedder.model, embedder.dims),
    ).fetchone()
    if not conn.autocommit:
        conn.commit()
    check_recorded_dims(embedder.fingerprint, int(row[1]), embedder.dims)
    return int(row[0])


def find_misses(conn: psycopg.Connection, embedder_id: int, shards: Iterable[int]) -> list[Miss]:
    """Distinct chunk texts of ``shards`` with no cached vector for this embedder."""
    rows = conn.execute(
        """SELECT DISTINCT ON (c.chunk_hash) c.chunk_hash, c.text, c.doc_id, c.seq, c.n_tokens
           FROM chunks c
           WHERE c.shard = ANY(%s) AND NOT EXISTS (
               SELECT 1 FROM rag_cache.embedding_cache e
               WHERE e.embedder_id = %s AND e.chunk_hash = c.chunk_hash)
           ORDER BY c.chunk_hash, c.doc_id, c.seq""",
        (sorted(set(shards)), embedder_id),
    ).fetchall()
    return [Miss(r[0], r[1], f"{r[2]}#{r[3]}", r[4]) for r in rows]


def store_vectors(
    conn: psycopg.Connection, embedder_id: int, hashes: list[str], vectors: np.ndarray, n_tokens: list[int]
) -> None:
    """Insert vectors by binary COPY (through a staging table so concurrent writers can't collide)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS cache_in (chunk_hash text, embedding vector, n_tokens int) "
            "ON COMMIT DELETE ROWS"
        )
        with cur.copy("COPY cache_in (chunk_hash, embedding, n_tokens) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["text", "vector", "int4"])
            for h, v, n in zip(hashes, vectors, n_tokens, strict=True):
                cp.write_row((h, v, n))
        cur.execute(
            """INSERT INTO rag_cache.embedding_cache (embedder_id, chunk_hash, embedding, n_tokens)
               SELECT %s, chunk_hash, embedding, n_tokens FROM cache_in
               ON CONFLICT (embedder_id, chunk_hash) DO NOTHING""",
            (embedder_id,),
        )


def fill_cache(
    conn: psycopg.Connection,
    embedder: Embedder,
    embedder_id: int,
    misses: list[Miss],
    stats: EmbedStats,
    *,
    commit_every: int | None = None,
    progress=None,
) -> None:
    """Embed ``misses`` and commit their vectors in groups (``Embedder.commit_group_size`` texts),
    so a crash loses at most one group of paid-for vectors."""
    commit_every = commit_every or embedder.commit_group_size
    for i in range(0, len(misses), commit_every):
        group = misses[i : i + commit_every]
        texts = [m.text for m in group]
        t0 = time.perf_counter()
        tokens_before = stats.tokens
        vectors = embedder.embed(texts, stats, labels=[m.label for m in group])
        if stats.tokens == tokens_before:  # providers that report no usage: count as the chunks did
            stats.add(tokens=sum(m.n_tokens for m in group))
        vectors = check_vectors(
            np.asarray(vectors), len(group), embedder.dims, f"embedder {embedder.fingerprint}"
        )
        store_vectors(conn, embedder_id, [m.chunk_hash for m in group], vectors, [m.n_tokens for m in group])
        if progress is not None:
            progress(len(group), time.perf_counter() - t0)
