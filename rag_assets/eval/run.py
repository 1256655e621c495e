"""Run a question set through the query path and score it: the figures that say whether an index
answers questions, and that a generation switch can be judged by.

Each question goes through :mod:`rag_assets.query` exactly as ``rag-assets query`` sends it (same
embedder, same HNSW search settings), against the live generation or, with ``generation=G``, against
generation G's own tables while the live one keeps serving. A document ranking is the chunk hits'
documents, each at its first rank; the search over-fetches chunks so that ``k`` distinct documents
are ranked even when one document fills several of the top hits.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from rag_assets.embedders import Embedder, make_embedder
from rag_assets.eval.metrics import dedupe, mrr_at_k, ndcg_at_k, recall_at_k
from rag_assets.eval.questions import Question, missing_docs
from rag_assets.query import (
    MODES,
    QueryError,
    QueryResult,
    candidate_depth,
    embed_query,
    search,
    search_hybrid,
    search_keyword,
    search_vector,
)
from rag_assets.rerank import make_reranker
from rag_assets.rerank.apply import rerank_result
from rag_assets.settings import Settings
from rag_assets.store import schema
from rag_assets.store.db import connect_index
from rag_assets.store.serving import Generation, get_generation, live_generation

OVERFETCH = 5  # chunks fetched per ranked document: one document often holds several top hits
MAX_FETCH = 1000  # rag_assets.query's bound on k


class EvalError(ValueError):
    """The evaluation cannot run as asked (unknown mode or generation, other embedder); says why."""


@dataclass(frozen=True)
class Scores:
    recall: float
    mrr: float
    ndcg: float

    @classmethod
    def of(cls, ranked: Sequence[str | None], relevant: Sequence[str], k: int) -> Scores:
        return cls(
            recall_at_k(ranked, relevant, k), mrr_at_k(ranked, relevant, k), ndcg_at_k(ranked, relevant, k)
        )

    @classmethod
    def mean(cls, scores: Sequence[Scores]) -> Scores:
        return cls(
            statistics.fmean(s.recall for s in scores),
            statistics.fmean(s.mrr for s in scores),
            statistics.fmean(s.ndcg for s in scores),
        )

    def as_dict(self, k: int) -> dict[str, float]:
        return {
            f"recall@{k}": round(self.recall, 4),
            f"mrr@{k}": round(self.mrr, 4),
            f"ndcg@{k}": round(self.ndcg, 4),
        }


@dataclass(frozen=True)
class QuestionResult:
    id: str
    split: str
    question: str
    relevant_docs: tuple[str, ...]
    ranked_docs: tuple[str, ...]  # the first k distinct documents, best first
    hits: tuple[str, ...]  # the first k chunk hits as "doc_id#seq"
    docs: Scores
    chunks: Scores | None  # None when the question labels no chunks
    seconds: float

    def as_dict(self, k: int) -> dict:
        return {
            "id": self.id,
            "split": self.split,
            "question": self.question,
            "relevant_docs": list(self.relevant_docs),
            "ranked_docs": list(self.ranked_docs),
            "hits": list(self.hits),
            "metrics": self.docs.as_dict(k),
            "chunk_metrics": self.chunks.as_dict(k) if self.chunks else None,
            "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True)
class EvalReport:
    k: int
    mode: str
    generation: int
    split: str | None
    results: list[QuestionResult]
    docs: Scores  # means over every question
    chunks: Scores | None  # means over the questions that label chunks; None when none does
    missing: list[tuple[str, str]] = field(default_factory=list)  # (question, doc) labelled but not indexed
    exact: bool = False  # ranked by exact distance rather than through the HNSW index
    rerank: str | None = None  # the reranker of the second stage (None: first stage only)
    rerank_depth: int | None = None  # first-stage candidates it re-scored per question

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def n_chunk_labelled(self) -> int:
        return sum(r.chunks is not None for r in self.results)

    def at(self, cutoff: int) -> Scores:
        """Mean document scores at a smaller cutoff (e.g. recall@5 of a k=10 run), from the rankings kept."""
        if not 1 <= cutoff <= self.k:
            raise ValueError(f"cutoff {cutoff}: must be between 1 and k={self.k}")
        return Scores.mean([Scores.of(r.ranked_docs, r.relevant_docs, cutoff) for r in self.results])

    def as_dict(self) -> dict:
        return {
            "k": self.k,
            "mode": self.mode,
            "generation": self.generation,
            "split": self.split,
            "exact": self.exact,
            "rerank": self.rerank,
            "rerank_depth": self.rerank_depth,
            "n": self.n,
            "metrics": self.docs.as_dict(self.k),
            "n_chunk_labelled": self.n_chunk_labelled,
            "chunk_metrics": self.chunks.as_dict(self.k) if self.chunks else None,
            "missing_docs": [{"id": q, "doc_id": d} for q, d in self.missing],
            "seconds_p50": round(statistics.median(r.seconds for r in self.results), 4),
            "results": [r.as_dict(self.k) for r in self.results],
        }


def _target(conn: psycopg.Connection, generation: int | None) -> tuple[Generation, bool]:
    """The generation to query and whether it is the live one."""
    live = live_generation(conn)
    if generation is None or (live is not None and live.id == generation):
        if live is None:
            raise EvalError("the index is empty: run `rag-assets index PATH` first")
        return live, True
    gen = get_generation(conn, generation)
    if gen is None or gen.state == "dropped":
        have = [r[0] for r in conn.execute("SELECT id FROM generations WHERE state <> 'dropped' ORDER BY id")]
        raise EvalError(f"generation {generation} does not exist or was dropped; generations kept: {have}")
    return gen, False


def _check_embedder(conn: psycopg.Connection, gen: Generation, embedder: Embedder) -> None:
    row = conn.execute(
        "SELECT fingerprint FROM rag_cache.embedders WHERE id = %s", (gen.embedder_id,)
    ).fetchone()
    if row is None or row[0] != embedder.fingerprint:
        raise EvalError(
            f"generation {gen.id} was built with embedder {row[0] if row else '?'!r} but RAG_EMBEDDER settings "
            f"give {embedder.fingerprint!r}; evaluate it with the settings it was built with"
        )


def _shadow_items(conn: psycopg.Connection, gen: int) -> None:
    """Point this session's ``items`` at generation ``gen`` with a temporary view.

    ``rag_assets.query`` reads the view ``items`` unqualified; PostgreSQL searches the session's
    temporary schema first when ``search_path`` does not name it, so the same query code ranks
    generation ``gen`` on this connection only, through that generation's own HNSW index, while every
    other reader still sees the live one.
    """
    conn.execute(sql.SQL("CREATE OR REPLACE TEMP VIEW items AS {}").format(schema.serving_view_sql(conn, gen)))


def _search_shadow(conn: psycopg.Connection, vec, text: str, fetch: int, opts: dict) -> QueryResult:
    mode = opts["mode"]
    if mode == "keyword":
        return search_keyword(conn, text, fetch)
    kw = {k: v for k, v in opts.items() if k in ("ef_search", "exact")}
    if mode == "hybrid":
        return search_hybrid(conn, vec, text, fetch, rrf_k=opts["rrf_k"], **kw)
    return search_vector(conn, vec, fetch, **kw)


def _doc_ids(conn: psycopg.Connection, gen: int, wanted: set[str]) -> set[str]:
    rows = conn.execute(
        sql.SQL("SELECT doc_id FROM {docs} WHERE doc_id = ANY(%s)").format(docs=schema.docs_table(gen)),
        (sorted(wanted),),
    )
    return {r[0] for r in rows}


def _chunk_ranking(q: Question, res: QueryResult, k: int) -> list[str | None]:
    """Each of the first ``k`` hits as the chunk label it satisfies first (a label counts once), else None."""
    out: list[str | None] = []
    used: set[int] = set()
    for h in res.results[:k]:
        hit = next(
            (i for i, lab in enumerate(q.relevant_chunks) if i not in used and lab.matches(h.doc_id, h.text)),
            None,
        )
        if hit is not None:
            used.add(hit)
        out.append(None if hit is None else str(hit))
    return out


def evaluate(
    settings: Settings,
    questions: Sequence[Question],
    k: int = 10,
    mode: str | None = None,
    generation: int | None = None,
    split: str | None = None,
    exact: bool = False,
    rerank: bool = False,
) -> EvalReport:
    """Score ``questions`` (only those of ``split`` when given) against the index ``settings`` name.

    ``mode`` is the ranking to use (``vector``, ``keyword``, ``hybrid``; default RAG_RETRIEVAL_MODE); ``generation``
    a generation other than the live one, e.g. one a backfill has just built. ``exact`` ranks by exact
    distance instead of the HNSW index: the embedder's and chunker's own quality, without the graph's
    approximation (two builds of one corpus can rank a few questions differently; docs/benchmarks.md).
    ``rerank`` adds the second stage configured by RAG_RERANK over ``max(RAG_RERANK_DEPTH, 5k)``
    first-stage chunks; a reranker failure fails the evaluation (never a silent first-stage score).
    """
    mode = mode or settings.retrieval_mode
    if mode not in MODES:
        raise EvalError(f"mode {mode!r} is not supported by the query path; supported: {list(MODES)}")
    if not 1 <= k <= MAX_FETCH // OVERFETCH:
        raise EvalError(f"k={k}: must be between 1 and {MAX_FETCH // OVERFETCH}")
    chosen = [q for q in questions if split is None or q.split == split]
    if not chosen:
        raise EvalError(f"no questions to evaluate (split={split!r})")
    fetch = min(MAX_FETCH, k * OVERFETCH)
    reranker = None
    if rerank:
        reranker = make_reranker(settings.with_secrets())
        if reranker is None:
            raise EvalError("rerank asked for but RAG_RERANK=off: set RAG_RERANK=http or local (or --rerank)")
    depth = candidate_depth(fetch, settings.rerank_depth) if reranker is not None else fetch
    conn = connect_index(settings)
    embedder = make_embedder(settings)
    try:
        gen, is_live = _target(conn, generation)
        _check_embedder(conn, gen, embedder)
        if not is_live:
            _shadow_items(conn, gen.id)
        wanted = {d for q in chosen for d in q.relevant_docs}
        missing = missing_docs(chosen, _doc_ids(conn, gen.id, wanted))
        results = []
        for q in chosen:
            t0 = time.perf_counter()
            try:
                opts = {"mode": mode, "rrf_k": settings.rrf_k}
                if mode != "keyword":
                    opts.update(ef_search=settings.hnsw_ef_search, exact=exact)
                if is_live:
                    res = search(conn, embedder, q.question, depth, **opts)
                else:
                    # the shadow view is generation G's: the live-embedder check of search() does not apply
                    vec = None if mode == "keyword" else embed_query(embedder, q.question)
                    res = _search_shadow(conn, vec, q.question, depth, opts)
                if reranker is not None:
                    res = rerank_result(reranker, q.question, res, fetch, on_error="fail")
            except QueryError as e:
                raise EvalError(f"question {q.id!r}: {e}") from None
            seconds = time.perf_counter() - t0
            ranked = [d for d in dedupe(h.doc_id for h in res.results) if d is not None][:k]
            results.append(
                QuestionResult(
                    id=q.id,
                    split=q.split,
                    question=q.question,
                    relevant_docs=q.relevant_docs,
                    ranked_docs=tuple(ranked),
                    hits=tuple(f"{h.doc_id}#{h.seq}" for h in res.results[:k]),
                    docs=Scores.of(ranked, q.relevant_docs, k),
                    chunks=(
                        Scores.of(
                            _chunk_ranking(q, res, k), [str(i) for i in range(len(q.relevant_chunks))], k
                        )
                        if q.relevant_chunks
                        else None
                    ),
                    seconds=seconds,
                )
            )
    finally:
        embedder.close()
        conn.close()
        if reranker is not None:
            reranker.close()
    labelled = [r.chunks for r in results if r.chunks is not None]
    return EvalReport(
        k=k,
        mode=mode,
        generation=gen.id,
        split=split,
        results=results,
        docs=Scores.mean([r.docs for r in results]),
        chunks=Scores.mean(labelled) if labelled else None,
        missing=missing,
        exact=exact,
        rerank=reranker.name if reranker is not None else None,
        rerank_depth=depth if reranker is not None else None,
    )
