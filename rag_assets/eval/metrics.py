"""Ranking metrics over ranked ids: pure functions, binary relevance.

Every metric takes a ranking (best first) and the set of relevant ids, and looks at the first ``k``
entries only. Rankings of documents come from chunk hits, so several entries may name the same
document: :func:`dedupe` keeps each id at its first (best) rank, as a reader scanning the hits would
meet it, and the metrics expect a ranking without repeats (a repeated relevant id would otherwise be
counted twice by nDCG). ``None`` entries are ranks that match nothing (a chunk hit that satisfies no
chunk label): they take a rank and are never relevant.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence


def dedupe(ranked: Iterable[str | None]) -> list[str | None]:
    """``ranked`` with every repeat of an id removed, each id kept at its first rank (``None`` kept)."""
    seen: set[str] = set()
    out: list[str | None] = []
    for r in ranked:
        if r is None:
            out.append(None)
        elif r not in seen:
            seen.add(r)
            out.append(r)
    return out


def _check(relevant: Collection[str], k: int) -> None:
    if k < 1:
        raise ValueError(f"k={k}: must be at least 1")
    if not relevant:
        raise ValueError("no relevant ids: a question needs at least one relevant document")


def recall_at_k(ranked: Sequence[str | None], relevant: Collection[str], k: int) -> float:
    """Share of the relevant ids found among the first ``k`` ranks."""
    _check(relevant, k)
    rel = set(relevant)
    found = {r for r in ranked[:k] if r is not None and r in rel}
    return len(found) / len(rel)


def mrr_at_k(ranked: Sequence[str | None], relevant: Collection[str], k: int) -> float:
    """1 / rank of the first relevant id within the first ``k`` ranks, 0 when there is none."""
    _check(relevant, k)
    rel = set(relevant)
    for i, r in enumerate(ranked[:k], 1):
        if r is not None and r in rel:
            return 1.0 / i
    return 0.0


def ndcg_at_k(ranked: Sequence[str | None], relevant: Collection[str], k: int) -> float:
    """Normalised discounted cumulative gain at ``k`` (gain 1 per relevant id, ``1/log2(rank+1)``).

    Divided by the gain of the ideal ranking (every relevant id first, at most ``k`` of them), so a
    perfect ranking scores 1 whatever the number of relevant ids.
    """
    _check(relevant, k)
    rel = set(relevant)
    seen: set[str] = set()
    dcg = 0.0
    for i, r in enumerate(ranked[:k], 1):
        if r is not None and r in rel and r not in seen:
            seen.add(r)
            dcg += 1.0 / math.log2(i + 1)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(rel), k) + 1))
    return dcg / ideal
