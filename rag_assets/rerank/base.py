"""The one interface every reranker implements, and its error.

A reranker re-scores the first stage's candidates (vector, keyword or hybrid retrieval) for one
question with a model that reads the question and each candidate together (a cross-encoder),
which ranks more precisely than comparing two independently made vectors, at the price of one
model pass per candidate per query. It never sees the database: :mod:`rag_assets.rerank.apply`
hands it the candidates' texts and puts the scores back on the hits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from rag_assets.query import QueryError


class RerankError(QueryError):
    """The reranker failed for good (after any retries); the message names the endpoint or model.

    ``kind`` puts it with the embedding failures for the CLI's exit code: a model API is down,
    the index is fine."""

    kind = "embedding"

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Scored:
    """Candidate ``index`` (its position in the list given to :meth:`Reranker.rerank`) and its score."""

    index: int
    score: float


class Reranker(ABC):
    """Scores candidates for a question; higher is more relevant. Thread-safe."""

    #: short, secret-free description for answers and logs, e.g. ``http:rerank-v3.5@api.cohere.com``
    name: str = "abstract"

    @abstractmethod
    def rerank(self, query: str, documents: Sequence[str], top_n: int) -> list[Scored]:
        """The best ``min(top_n, len(documents))`` candidates, best first (ties: the earlier
        candidate first, so the first stage's order breaks them). Raises :class:`RerankError`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or models."""


def best_first(scores: Sequence[float], top_n: int) -> list[Scored]:
    """Indices of ``scores`` sorted by score, descending, earlier index first on ties; the first ``top_n``."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [Scored(i, float(scores[i])) for i in order[: max(0, top_n)]]
