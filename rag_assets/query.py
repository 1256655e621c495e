"""Top-k retrieval over the live generation: by vector, by keyword (Postgres full text), or both fused.

Modes (``rag-assets query --mode``, the query API's ``mode``, RAG_RETRIEVAL_MODE):

- ``vector``: cosine similarity to the embedded question; ``score`` is the similarity (1 = same direction).
- ``keyword``: the generation's stored ``tsvector``, in the generation's own text search configuration,
  matched by the rarer words of a plain question (by the generation's ANALYZE statistics, at most
  :data:`KEYWORD_CANDIDATES` chunks), or by ``websearch_to_tsquery`` when the text uses its narrowing
  syntax (``"a phrase"``, ``-word``); ``score`` is ``ts_rank_cd`` over every word, plus 1 for a chunk
  that holds every word (:func:`search_keyword`).
- ``hybrid``: both arms, each over-fetched (:func:`arm_depth`) with the metadata filter applied inside
  it, fused by reciprocal rank fusion (:func:`rrf_fuse`); ``score`` is the fused score,
  ``sum(1 / (rrf_k + rank))`` over the arms that found the chunk (at most ``2 / (rrf_k + 1)``).

``min_score`` is compared with the mode's own score. pgvector applies WHERE clauses after the HNSW scan, so a selective filter on a plain scan returns
fewer than k rows (pgvector#751). We enable iterative index scans (pgvector ≥ 0.8) in the query's
transaction, and re-sort the over-fetched candidates by exact distance, as the pgvector README
recommends for ``relaxed_order``.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from rag_assets.chunking import heading_path_of
from rag_assets.embedders import Embedder, EmbedStats
from rag_assets.store import schema
from rag_assets.store.generations import GEN_LOCK
from rag_assets.store.serving import live_generation

if TYPE_CHECKING:
    from rag_assets.rerank.base import Reranker

MODES = ("vector", "keyword", "hybrid")
DEFAULT_RRF_K = 60  # Cormack et al. 2009's constant; RAG_RRF_K
ARM_FACTOR = 4  # each hybrid arm ranks this many times k candidates before fusing
ARM_MIN = 20
MAX_K = 1000
log = logging.getLogger(__name__)

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
    pages: list[int] | None = None  # the pages (slides, sheets) of a converted document this chunk spans


def with_pages(conn: psycopg.Connection, result: QueryResult) -> QueryResult:
    """Each hit with what its chunk row adds, from one lookup of the hits' spans:

    - ``metadata["heading_path"]``: the chunk's heading path (document title › section › ...), a
      list of strings, ``[]`` before the first heading or for a chunk indexed before heading paths
      (``chunking.heading_path_of``: the stored text is the header followed by the document slice,
      so the span's length says where the header ends; nothing else stores it);
    - ``pages`` for a paged document (a converted PDF, PPTX or XLSX: ``page_starts`` in its
      metadata): the page numbers its chunk spans, so an answer can cite them; ``page_starts``
      itself (one offset per page) is left out of the hit's metadata.
    """
    if not result.results:
        return result
    spans = dict(
        (cid, (s, e))
        for cid, s, e in conn.execute(
            "SELECT chunk_id, char_start, char_end FROM chunks WHERE chunk_id = ANY(%s)",
            ([h.chunk_id for h in result.results],),
        )
    )
    out = []
    for h in result.results:
        span = spans.get(h.chunk_id)
        path = heading_path_of(h.text, span[1] - span[0]) if span is not None else []
        starts = h.metadata.get("page_starts")
        if not isinstance(starts, list):
            out.append(replace(h, metadata={**h.metadata, "heading_path": path}))
            continue
        meta = {k: v for k, v in h.metadata.items() if k != "page_starts"}
        meta["heading_path"] = path
        pages = None
        if span is not None:
            s, e = span
            first = max(1, bisect.bisect_right(starts, s))
            last = max(first, bisect.bisect_left(starts, max(s + 1, e)))
            pages = list(range(first, last + 1))
        out.append(replace(h, metadata=meta, pages=pages))
    return replace(result, results=out)


@dataclass(frozen=True)
class RerankInfo:
    """What the second stage did (:mod:`rag_assets.rerank.apply`): ``applied`` False means the
    reranker failed and the hits are the first stage's, in its order (``error`` says why)."""

    reranker: str  # e.g. "http:rerank-v3.5@api.cohere.com", "local:ms-marco-MiniLM-L-6-v2"
    candidates: int  # first-stage hits it was given
    applied: bool
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class QueryResult:
    results: list[Hit]
    generation: int | None
    rerank: RerankInfo | None = None  # None: no rerank step was asked for

    def as_dict(self) -> dict:
        out: dict = {"results": [asdict(h) for h in self.results], "generation": self.generation}
        if self.rerank is not None:
            out["rerank"] = asdict(self.rerank)
        return out


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


def _and_filter_sql(filt: Mapping[str, object] | None) -> tuple[str, list]:
    where, params = _filter_sql(filt)
    return (" AND " + where.removeprefix(" WHERE ") if where else ""), params


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise QueryError(f"k={k}: must be between 1 and {MAX_K}")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise QueryError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


def candidate_depth(k: int, depth: int) -> int:
    """First-stage hits a reranker re-scores for a top-``k`` answer: ``depth`` (RAG_RERANK_DEPTH),
    at least ``k``, at most :data:`MAX_K`."""
    return min(MAX_K, max(k, depth))


def arm_depth(k: int) -> int:
    """Candidates each hybrid arm ranks for a top-``k`` answer: 4×k (at least 20, at most 1000), so a
    chunk ranked low by one arm but high by the other can still reach the fused top k."""
    return min(MAX_K, max(ARM_FACTOR * k, ARM_MIN))


def rrf_fuse(rankings: Sequence[Sequence[str]], k: int = DEFAULT_RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: each id scores ``sum(1 / (k + rank))`` over the rankings that hold it
    (rank 1 = best), best first; ties go to the better best rank, then to the id. Only ranks count,
    so a cosine similarity and a ``ts_rank_cd`` need no common scale."""
    if k < 1:
        raise QueryError(f"rrf_k={k}: must be at least 1")
    scores: dict[str, float] = {}
    best: dict[str, int] = {}
    for ranking in rankings:
        for rank, key in enumerate(dict.fromkeys(ranking), 1):  # an id counts once per ranking
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
            best[key] = min(best.get(key, rank), rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]], kv[0]))


def _repair_view(conn: psycopg.Connection) -> None:
    """Redefine ``items`` (under the generation lock) when it predates the full-text columns: an index
    built by an earlier release keeps its view until the next switch."""
    with conn.transaction():
        conn.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(GEN_LOCK))
        live = live_generation(conn)
        if live is None:
            raise QueryError("the index is empty: run `rag-assets index PATH` first")
        conn.execute("DROP VIEW IF EXISTS items")
        schema.point_view_at(conn, live.id)


# The OR of the text's lexemes, normalised by the generation's configuration (stop words dropped).
_ANY_WORD = """(SELECT string_agg(quote_literal(l), ' | ')
                FROM unnest(tsvector_to_array(to_tsvector(v.ts_config, %(text)s))) l)::tsquery"""
# The OR of the text's rarest lexemes: sorted by the number of chunks ANALYZE estimates to hold each
# (pg_stats.most_common_elem_freqs of the generation's tsv column times its rows; a lexeme not in the
# list is rarer than the list's minimum, counted as that minimum), a lexeme is kept while its chunks and
# those of the rarer ones add up to at most %(budget)s. The rarest is always kept; with no statistics
# (never analysed) every lexeme counts 0 chunks, so all are kept: the any-word query.
# ``v`` is the view's one row of :data:`_PLAN` (its generation and text search configuration).
_RARE_WORDS = """(SELECT string_agg(quote_literal(w.l), ' | ') FILTER (WHERE w.n = 1 OR w.upto <= %(budget)s)
                  FROM (SELECT d.l, sum(d.df) OVER (ORDER BY d.df, d.l ROWS UNBOUNDED PRECEDING) AS upto,
                               row_number() OVER (ORDER BY d.df, d.l) AS n
                        FROM (SELECT l, coalesce(st.n * coalesce(st.f[array_position(st.e, l)],
                                                                 st.f[array_length(st.f, 1) - 1]), 0) AS df
                              FROM unnest(tsvector_to_array(to_tsvector(v.ts_config, %(text)s))) l
                              LEFT JOIN (SELECT s.most_common_elems::text::text[] AS e,
                                                s.most_common_elem_freqs AS f, greatest(c.reltuples, 0) AS n
                                         FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
                                         JOIN pg_stats s ON s.schemaname = ns.nspname
                                              AND s.tablename = c.relname AND s.attname = 'tsv'
                                         WHERE c.oid = to_regclass('g' || v.generation || '_items')) st ON true
                             ) d
                       ) w)::tsquery"""
# Chunks a plain question's keyword match may cover: the rarer words are kept while their estimated
# chunks add up to this, and at most this many chunks are ranked per branch (the rarer words', the
# all-words'): the rarest word alone can be in most chunks, and ranking reads each candidate's row.
# Chosen on the dev splits (docs/benchmarks.md): 500 and 1000 lost Django recall@10, 2000 lost nothing.
KEYWORD_CANDIDATES = 2000
_SEARCH_SYNTAX = re.compile(r'"|(^|\s)-\w')


def uses_search_syntax(text: str) -> bool:
    """Whether ``text`` uses web-search syntax that narrows (``"a phrase"``, ``-word``): it is then
    taken literally by ``websearch_to_tsquery``. ``or`` does not count: questions say it ("exists() or
    count()?"), and matching any word already includes both sides. Plain text (a question) matches
    chunks holding any of its rarer words instead (:func:`search_keyword`): requiring every word of "How do I make a group of database writes atomic?"
    matched 12 % of the samples set's dev questions within 10, any word ranked by density far more."""
    return bool(_SEARCH_SYNTAX.search(text))


@dataclass(frozen=True)
class KeywordPlan:
    """What :func:`search_keyword` matches and ranks, worked out from the view ``items`` and the
    statistics of the generation it shows, as tsquery texts (None: the text has no lexeme)."""

    generation: int
    stored_tsv: bool  # the generation's table has the stored (GIN-indexed) tsv column
    match: str | None  # the chunks ranked: the rarest words' OR, or the literal search-syntax query
    rank_by: str | None  # what ts_rank_cd scores: every word's OR, or the literal query
    every: str | None  # websearch_to_tsquery of the whole text: +1 to the chunks it matches


_PLAN = """SELECT v.generation,
                   EXISTS (SELECT 1 FROM pg_attribute a
                           WHERE a.attrelid = to_regclass('g' || v.generation || '_items')
                             AND a.attname = 'tsv' AND NOT a.attisdropped),
                   {match}::text, {rank_by}::text, websearch_to_tsquery(v.ts_config, %(text)s)::text
            FROM (SELECT generation, ts_config FROM items LIMIT 1) v"""


def _budget(candidates: int | None) -> int:
    budget = KEYWORD_CANDIDATES if candidates is None else int(candidates)
    if budget < 1:
        raise QueryError(f"candidates={budget}: must be at least 1")
    return budget


def keyword_plan(conn: psycopg.Connection, text: str, candidates: int | None = None) -> KeywordPlan | None:
    """The tsqueries of ``text`` for the generation the view ``items`` shows (None: it is empty).

    One small statement before the ranking one: the ranking statement then carries constant
    tsqueries, which the planner estimates from the same statistics (rather than a generic guess
    for a subquery's result), and it can rank in the generation's own table (:func:`search_keyword`)."""
    every = "websearch_to_tsquery(v.ts_config, %(text)s)"
    if uses_search_syntax(text):
        stmt = _PLAN.format(match=every, rank_by=every)
    else:
        stmt = _PLAN.format(match=_RARE_WORDS, rank_by=_ANY_WORD)
    row = conn.execute(stmt, {"text": text, "budget": _budget(candidates)}).fetchone()
    if row is None:
        return None
    gen, stored, match, rank_by, all_words = row
    return KeywordPlan(int(gen), bool(stored), match or None, rank_by or None, all_words or None)


def search_keyword(
    conn: psycopg.Connection,
    text: str,
    k: int = 10,
    filt: Mapping[str, object] | None = None,
    min_score: float | None = None,
    *,
    candidates: int | None = None,
) -> QueryResult:
    """Top-k chunks of the live generation whose full text matches ``text``, by ``ts_rank_cd``.

    Text with web-search syntax must match as ``websearch_to_tsquery`` reads it; plain text matches
    its rarer words (:func:`uses_search_syntax`, ``_RARE_WORDS``): the words are taken rarest first,
    by the chunk counts ANALYZE recorded for the generation, while the chunks of those already taken
    add up to less than ``candidates`` (default :data:`KEYWORD_CANDIDATES`); the rarest is always
    taken, so every chunk holding all the words is a candidate. Ranking reads each candidate's
    tsvector, so a word found in most chunks made a question rank most of the index; its chunks
    now count only when they also hold a rarer word. The score is ``ts_rank_cd`` over all the
    words, plus 1 when the chunk matches ``websearch_to_tsquery`` of the whole text (every word).
    A text of stop words only matches nothing.

    Without a metadata filter the candidates are ranked in the generation's table alone and only
    the top k are joined to their positions and metadata (the view ``items`` joins three tables
    for every candidate)."""
    _check_k(k)
    if not text or not text.strip():
        raise QueryError("query text is empty")
    where, params = _and_filter_sql(filt)
    where = where.replace("%s", "%(f{})s").format(*range(len(params)))
    budget = _budget(candidates)
    rows: list = []
    plan = None
    for attempt in range(4):
        try:
            with conn.transaction():
                plan = keyword_plan(conn, text, budget)
                if plan is None or plan.match is None or plan.rank_by is None:
                    rows = []
                    break
                args = {
                    "match": plan.match,
                    "rank_by": plan.rank_by,
                    "every": plan.every or plan.match,
                    "k": k,
                    "cap": budget,
                    **{f"f{i}": p for i, p in enumerate(params)},
                }
                rank = "ts_rank_cd(tsv, %(rank_by)s::tsquery) + (tsv @@ %(every)s::tsquery)::int"
                if plan.stored_tsv and not where:
                    stmt = sql.SQL(
                        f"""WITH top AS MATERIALIZED (
                               SELECT chunk_id, doc_id, {rank} AS rank
                               FROM (SELECT chunk_id, doc_id, tsv FROM {{items}}
                                     WHERE tsv @@ %(match)s::tsquery LIMIT %(cap)s) a
                               UNION
                               SELECT chunk_id, doc_id, {rank} AS rank
                               FROM (SELECT chunk_id, doc_id, tsv FROM {{items}}
                                     WHERE tsv @@ %(every)s::tsquery LIMIT %(cap)s) b
                               ORDER BY rank DESC, doc_id, chunk_id LIMIT %(k)s)
                           SELECT v.chunk_id, v.doc_id, v.seq, v.text, v.metadata, v.generation, top.rank
                           FROM top JOIN items v ON v.chunk_id = top.chunk_id
                           ORDER BY top.rank DESC, v.doc_id, v.seq"""
                    ).format(items=schema.items_table(plan.generation))
                else:
                    stmt = sql.SQL(
                        f"""SELECT chunk_id, doc_id, seq, text, metadata, generation, {rank} AS rank
                           FROM items WHERE tsv @@ %(match)s::tsquery{where}
                           ORDER BY rank DESC, doc_id, seq LIMIT %(k)s"""
                    )
                rows = conn.execute(stmt, args).fetchall()
            # a switch between the two statements: the rows are another generation's; again
            if all(r[5] == plan.generation for r in rows) or attempt == 3:
                break
        except psycopg.errors.UndefinedTable:
            if plan is not None and attempt < 3:
                continue  # the planned generation's table was dropped meanwhile
            raise QueryError("the index is empty: run `rag-assets index PATH` first") from None
        except psycopg.errors.UndefinedColumn:
            if attempt >= 1:
                raise
            _repair_view(conn)
    hits = []
    generation = None
    for chunk_id, doc_id, seq, body, metadata, gen, rank in rows:
        generation = gen
        score = float(rank)
        if min_score is not None and score < min_score:
            continue
        hits.append(Hit(doc_id, seq, round(score, 6), body, bounded_metadata(metadata), chunk_id))
    if generation is None:
        live = live_generation(conn)
        generation = live.id if live else None
    return QueryResult(hits, generation)


def search_hybrid(
    conn: psycopg.Connection,
    vector: np.ndarray,
    text: str,
    k: int = 10,
    filt: Mapping[str, object] | None = None,
    min_score: float | None = None,
    *,
    rrf_k: int = DEFAULT_RRF_K,
    **kw,
) -> QueryResult:
    """Top-k chunks by reciprocal rank fusion of the vector and keyword rankings (``score`` = fused).

    Both arms read the view ``items``; if a generation switch lands between them (they are two
    statements), they are run again so one answer never mixes two generations."""
    _check_k(k)
    depth = arm_depth(k)
    for _ in range(3):
        vec = search_vector(conn, vector, depth, filt, **kw)
        kwd = search_keyword(conn, text, depth, filt)
        # an arm with no rows reports the live generation read afterwards, which says nothing
        if not (vec.results and kwd.results) or vec.generation == kwd.generation:
            break
    else:
        raise QueryError("the live generation kept switching during the query; try again")
    by_id = {h.chunk_id: h for h in (*kwd.results, *vec.results)}
    fused = rrf_fuse([[h.chunk_id for h in vec.results], [h.chunk_id for h in kwd.results]], rrf_k)
    hits = []
    for chunk_id, score in fused:
        if min_score is not None and score < min_score:
            continue
        h = by_id[chunk_id]
        hits.append(Hit(h.doc_id, h.seq, round(score, 6), h.text, h.metadata, h.chunk_id))
        if len(hits) == k:
            break
    return QueryResult(hits, vec.generation if vec.results or not kwd.results else kwd.generation)


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
    _check_k(k)
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
    return embedder.embed([text], EmbedStats(), labels=["query"], purpose="query")[0]


def search_embedded(
    conn: psycopg.Connection,
    embedder: Embedder,
    vector: np.ndarray | None,
    k: int = 10,
    filt: Mapping[str, object] | None = None,
    min_score: float | None = None,
    *,
    mode: str = "vector",
    text: str | None = None,
    rrf_k: int = DEFAULT_RRF_K,
    **kw,
) -> QueryResult:
    """Top-k chunks in ``mode`` for a vector made by ``embedder`` (:func:`embed_query`; None for
    ``keyword``) and the question's ``text`` (``keyword``, ``hybrid``): refused unless the live
    generation was built by the same embedder (checked here, on this connection, so a generation
    switched while the text was being embedded is caught)."""
    check_mode(mode)
    check_embedder_matches(conn, embedder)
    if mode != "vector" and (text is None or not text.strip()):
        raise QueryError("query text is empty")
    if mode == "keyword":
        return with_pages(conn, search_keyword(conn, text or "", k, filt, min_score))
    if vector is None:
        raise QueryError(f"mode {mode!r} needs the query vector")
    if mode == "hybrid":
        return with_pages(conn, search_hybrid(conn, vector, text or "", k, filt, min_score, rrf_k=rrf_k, **kw))
    return with_pages(conn, search_vector(conn, vector, k, filt, min_score, **kw))


def search(
    conn: psycopg.Connection,
    embedder: Embedder,
    text: str,
    k: int = 10,
    filt: Mapping[str, object] | None = None,
    min_score: float | None = None,
    *,
    mode: str = "vector",
    rrf_k: int = DEFAULT_RRF_K,
    reranker: Reranker | None = None,
    rerank_depth: int = 50,
    rerank_on_error: str = "fallback",
    **kw,
) -> QueryResult:
    """Top-k chunks for ``text`` in ``mode`` (the text is embedded by the live generation's
    embedder unless the mode is ``keyword``); with a ``reranker``, the first stage ranks
    :func:`candidate_depth` candidates and the reranker picks the best k of them
    (:func:`rag_assets.rerank.apply.rerank_result`, ``rerank_on_error`` ``fallback`` or ``fail``).

    For a dedicated connection (the CLI). With a pool, call :func:`check_embedder_matches`,
    :func:`embed_query` without a connection, then :func:`search_embedded`, and rerank after
    giving the connection back (as the service does).
    """
    if not text or not text.strip():
        raise QueryError("query text is empty")
    check_mode(mode)
    check_embedder_matches(conn, embedder)
    vector = None if mode == "keyword" else embed_query(embedder, text)
    depth = k if reranker is None else candidate_depth(k, rerank_depth)
    first = search_embedded(conn, embedder, vector, depth, filt, min_score, mode=mode, text=text, rrf_k=rrf_k, **kw)
    if reranker is None:
        return first
    from rag_assets.rerank.apply import rerank_result  # the rerank package imports this module

    return rerank_result(reranker, text, first, k, on_error=rerank_on_error)
