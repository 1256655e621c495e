"""Applying a reranker to a first-stage answer: the second stage of retrieval.

The first stage (vector, keyword or hybrid; :mod:`rag_assets.query`) ranks ``depth`` candidates
(``RAG_RERANK_DEPTH``, at least k); the reranker re-scores them against the question and the best
k are the answer, each hit's ``score`` now the reranker's (a relevance score whose scale is the
model's: Cohere's and TEI's lie in [0, 1], a raw cross-encoder's are logits). ``min_score`` still
applies to the first stage's score, before reranking. No database is touched here, so a caller
with a connection pool gives its connection back before the reranker waits on the network.

When the reranker fails (after its own retries), ``on_error`` decides:

``fallback`` (the default, ``RAG_RERANK_ON_ERROR``)
    the first stage's top k, in its order, with ``rerank.applied = false`` and the error in the
    answer (and a warning in the log): reranking is a refinement of a complete answer, and an
    outage of the rerank API should cost precision, not the search itself.
``fail``
    :class:`~rag_assets.rerank.base.RerankError` naming the endpoint. Evaluation always fails:
    a fallback there would report the first stage's quality as the reranker's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from rag_assets.query import QueryResult, RerankInfo
from rag_assets.rerank.base import Reranker, RerankError

ON_ERROR = ("fallback", "fail")
log = logging.getLogger(__name__)


def rerank_result(
    reranker: Reranker, text: str, result: QueryResult, k: int, *, on_error: str = "fallback"
) -> QueryResult:
    """``result``'s hits (the first stage's candidates) re-scored by ``reranker`` for ``text``: the best ``k``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}: use one of {', '.join(ON_ERROR)}")
    candidates = result.results
    t0 = time.perf_counter()
    try:
        scored = reranker.rerank(text, [h.text for h in candidates], min(k, len(candidates))) if candidates else []
    except RerankError as e:
        seconds = time.perf_counter() - t0
        if on_error == "fail":
            raise
        log.warning("rerank failed, answering in first-stage order: %s", e)
        info = RerankInfo(reranker.name, len(candidates), False, round(seconds, 4), str(e))
        return replace(result, results=candidates[:k], rerank=info)
    hits = [replace(candidates[s.index], score=round(s.score, 6)) for s in scored]
    info = RerankInfo(reranker.name, len(candidates), True, round(time.perf_counter() - t0, 4))
    return replace(result, results=hits, rerank=info)
