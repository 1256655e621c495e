"""Top-k retrieval over the live generation, with metadata filters that still return k results.

pgvector applies WHERE clauses after the HNSW scan, so a selective filter on a plain scan returns
fewer than k rows (pgvector#751). We enable iterative index scans (pgvector ≥ 0.8) in the query's
transaction, and re-sort the over-fetched candidates by exact distance, as the pgvector README
recommends for ``relaxed_order``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from rag_assets.embedders import Embedder, EmbedStats
from rag_assets.store.serving import live_generation

DEFAULT_EF_SEARCH = 100  # pgvector's 40 gave recall@10 0.89 at 10k chunks in benchmarks/query_latency.py
# A hit carries at most this much metadata (canonical JSON). Indexing refuses documents whose metadata
# is larger than RAG_MAX_METADATA_BYTES (default the same 64 KiB); this caps rows indexed before that
# bound existed, or under a larger setting, so one document cannot make every response huge.
MAX_HIT_METADATA_BYTES = 64 * 1024
_HIT_TITLE_CHARS = 1000


class QueryError(ValueError):
    """The query cannot run (bad filter, no index yet, embedder mismatch); the message says why."""


@dataclass(frozen=True)
class Hit:
    doc_id: str
    seq: int
    score: float
    text: str
    metadata: dict
    chunk_id: str


@dataclass(frozen=True)
class QueryResult:
    results: list[Hit]
    generation: int | None

    def as_dict(self) -> dict:
        return {"results": [asdict(h) for h in self.results], "generation": self.generation}


def parse_filters(pairs: list[str] | None) -> dict[str, object]:
    """``KEY=VALUE`` pairs → a filter dict; VALUE is JSON when it parses (numbers, true), else text."""
    out: dict[str, object] = {}
    for p in pairs or []:
        key, sep, raw = p.partition("=")
        if not sep or not key:
            raise QueryError(f"bad filter {p!r}: use KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = value
    return out


def _filter_sql(filt: Mapping[str, object] | None) -> tuple[str, list]:
    """Each key must match: equal to the value, or (for list metadata) contain it."""
    if not filt:
        return "", []
    clauses, params = [], []
    for k, v in filt.items():
        if not isinstance(k, str) or not k:
            raise QueryError(f"bad filter key {k!r}")
        if isinstance(v, list | dict):
            clauses.append("metadata @> %s")
            params.append(Jsonb({k: v}))
        else:
            clauses.append("(metadata @> %s OR metadata @> %s)")
            params.extend([Jsonb({k: v}), Jsonb({k: [v]})])
    return " WHERE " + " AND ".join(clauses), params


def search_vector(
    conn: psycopg.Connection,
    vector: np.ndarray,
    k: int = 10,
    filt: Mapping[str, object] | None = None,
    min_score: float | None = None,
    *,
    ef_search: int | None = None,
    exact: bool = False,
) -> QueryResult:
    """Top-k chunks of the live generation by cosine similarity to ``vector``."""
    if not 1 <= k <= 1000:
        raise QueryError(f"k={k}: must be between 1 and 1000")
    where, params = _filter_sql(filt)
    tiebreak = ", doc_id, seq" if exact else ""  # exact search is the reference: make ties deterministic
    q = np.asarray(vector, dtype=np.float32)
    with conn.transaction():
        if exact:
            conn.execute("SET LOCAL enable_indexscan = off")
        else:
            conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
            conn.execute(f"SET LOCAL hnsw.ef_search = {int(max(ef_search or DEFAULT_EF_SEARCH, k))}")
        try:
            rows = conn.execute(
                f"""WITH r AS MATERIALIZED (
                        SELECT chunk_id, doc_id, seq, text, metadata, generation,
                               embedding <=> %s::vector AS distance
                        FROM items{where}
                        ORDER BY embedding <=> %s::vector{tiebreak} LIMIT %s)
                    SELECT chunk_id, doc_id, seq, text, metadata, generation, distance
                    FROM r ORDER BY distance + 0, doc_id, seq""",
                [q, *params, q, k],
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            raise QueryError("the index is empty: run `rag-assets index PATH` first") from None
        except psycopg.errors.DataException as e:
            raise QueryError(f"query vector does not fit the index: {e}".strip()) from None
    hits = []
    generation = None
    for chunk_id, doc_id, seq, text, metadata, gen, dist in rows:
        generation = gen
        score = 1.0 - float(dist)
        if min_score is not None and score < min_score:
            continue
        hits.append(Hit(doc_id, seq, round(score, 6), text, bounded_metadata(metadata), chunk_id))
    if generation is None:
        live = live_generation(conn)
        generation = live.id if live else None
    return QueryResult(hits, generation)


def bounded_metadata(metadata: object, limit: int = MAX_HIT_METADATA_BYTES) -> dict:
    """A hit's metadata, or, when its canonical JSON is over ``limit`` bytes, only its ``path`` and
    ``title`` (cut to 1000 characters) with ``"metadata_truncated": true``."""
    if not isinstance(metadata, dict):
        return {}
    size = len(json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    if size <= limit:
        return metadata
    out: dict = {"metadata_truncated": True}
    for key in ("path", "title"):
        v = metadata.get(key)
        if isinstance(v, str):
            out[key] = v if len(v) <= _HIT_TITLE_CHARS else v[: _HIT_TITLE_CHARS - 1] + "…"
    return out


def check_embedder_matches(conn: psycopg.Connection, embedder: Embedder) -> None:
    """Queries must be embedded by the model that built the live generation."""
    row = conn.execute(
        "SELECT e.fingerprint FROM live l JOIN generations g ON g.id = l.generation "
        "JOIN rag_cache.embedders e ON e.id = g.embedder_id"
    ).fetchone()
    if row is None:
        raise QueryError("the index is empty: run `rag-assets index PATH` first")
    if row[0] != embedder.fingerprint:
        raise QueryError(
            f"the live index was built with embedder {row[0]!r} but RAG_EMBEDDER settings give "
            f"{embedder.fingerprint!r}; query with the same settings, or re-index"
        )


def embed_query(embedder: Embedder, text: str) -> np.ndarray:
    """The query vector of ``text``. No database: a remote embedder waits on the network here, and
    a caller with a connection pool must not hold a connection meanwhile (the service embeds first,
    then takes a connection for the SQL only)."""
    if not text or not text.strip():
        raise QueryError("query text is empty")
    return embedder.embed([text], EmbedStats(), labels=["query"])[0]


def search_embedded(
    conn: psycopg.Connection,
    embedder: Embedder,
    vector: np.ndarray,
    k: int = 10,
    filt: Mapping[str, object] | None = None,
    min_score: float | None = None,
    **kw,
) -> QueryResult:
    """Top-k chunks for a vector made by ``embedder`` (:func:`embed_query`): refused unless the live
    generation was built by the same embedder (checked here, on this connection, so a generation
    switched while the text was being embedded is caught)."""
    check_embedder_matches(conn, embedder)
    return search_vector(conn, vector, k, filt, min_score, **kw)


def search(
    conn: psycopg.Connection,
    embedder: Embedder,
    text: str,
    k: int = 10,
    filt: Mapping[str, object] | None = None,
    min_score: float | None = None,
    **kw,
) -> QueryResult:
    """Embed ``text`` with the live generation's embedder and return the top-k chunks.

    For a dedicated connection (the CLI). With a pool, call :func:`check_embedder_matches`,
    :func:`embed_query` without a connection, then :func:`search_embedded` (as the service does).
    """
    if not text or not text.strip():
        raise QueryError("query text is empty")
    check_embedder_matches(conn, embedder)
    return search_embedded(conn, embedder, embed_query(embedder, text), k, filt, min_score, **kw)
