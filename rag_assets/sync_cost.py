"""Which way a refresh writes its serving rows: into the live generation, or into a rebuilt one.

Writing into the live generation inserts every new row into its HNSW graph one by one; each insert
searches the graph (cost ~ log n) and writes WAL for the pages it touches. Past some share of the
index that is slower than building a new generation: copy the unchanged rows inside Postgres
(``INSERT ... SELECT`` into tables without the vector index), add the new rows, build the HNSW graph
once (in memory, with parallel workers), and switch atomically. Both ways end with the same rows
(same index digest) and embed the same texts: embeddings come from the cache either way.

Pure functions over counts (the inputs, measured in SQL by ``store/rebuild.py``) and coefficients
(measured by ``benchmarks/sync_strategy.py``, overridable with ``RAG_SYNC_*``), so the decision is
tested without a database and recorded with its inputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

STRATEGIES = ("auto", "live", "rebuild")


@dataclass(frozen=True)
class SyncCosts:
    """Coefficients of the cost model, in microseconds per row (defaults: docs/benchmarks.md).

    ``live_row_us`` is one insert into an HNSW-indexed table per log2 of the rows already in it;
    ``build_row_us`` the same for a one-shot HNSW build (as configured: memory, parallel workers);
    ``copy_row_us`` one row copied inside the server into the new tables (items + position, its
    full-text column recomputed, secondary indexes built afterwards); ``rebuild_fixed_s`` what a
    rebuild costs whatever its size (DDL, ANALYZE, verify, switch; the fit folds it into
    ``build_row_us``). ``min_saving_s``: ``auto`` rebuilds only when that saves at least this much,
    because a rebuild also costs what time does not show: the serving tables twice on disk until the
    old generation is dropped, one more retired generation kept (``RAG_KEEP_GENERATIONS``), every
    shard lock held during the copy. Small indexes, where both paths take a second or two, stay live.
    """

    live_row_us: float = 1050.0
    copy_row_us: float = 310.0
    build_row_us: float = 36.0
    rebuild_fixed_s: float = 0.0
    min_saving_s: float = 5.0


@dataclass(frozen=True)
class SyncWork:
    """What a sync would do, measured before it starts (``store/rebuild.py:measure_sync_work``)."""

    rows_in_generation: int  # rows of the live generation now
    rows_to_write: int  # chunks of the pending shards the live generation lacks
    rows_to_delete: int  # rows of the live generation whose chunk is gone
    rows_after: int  # rows once the sync is done (= chunks)

    @property
    def rows_to_copy(self) -> int:
        """Rows a rebuild copies from the live generation: those whose chunk is still current."""
        return max(0, self.rows_in_generation - self.rows_to_delete)


def _log2(n: int) -> float:
    return math.log2(max(n, 2))


def predict_live_s(work: SyncWork, costs: SyncCosts) -> float:
    """Seconds to insert the new rows into the live HNSW graph (it grows as they go in)."""
    mid = work.rows_in_generation + work.rows_to_write / 2
    return work.rows_to_write * costs.live_row_us * _log2(int(mid)) / 1e6


def predict_rebuild_s(work: SyncWork, costs: SyncCosts) -> float:
    """Seconds to copy the live rows, write the new ones unindexed, build the graph once and switch."""
    copy = (work.rows_to_copy + work.rows_to_write) * costs.copy_row_us / 1e6
    build = work.rows_after * costs.build_row_us * _log2(work.rows_after) / 1e6
    return costs.rebuild_fixed_s + copy + build


@dataclass(frozen=True)
class SyncDecision:
    """The path one refresh took, with the inputs and predictions it was chosen from.

    ``strategy`` is ``live`` or ``rebuild`` when a choice was made; ``new`` when the target is
    already a new generation (first index, ``--full``, a model or chunker change, or an interrupted
    rebuild being resumed), where there is nothing to choose.
    """

    strategy: str
    setting: str
    reason: str
    rows_in_generation: int = 0
    rows_to_write: int = 0
    rows_to_delete: int = 0
    rows_after: int = 0
    predicted_live_s: float = 0.0
    predicted_rebuild_s: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["predicted_live_s"] = round(self.predicted_live_s, 4)
        d["predicted_rebuild_s"] = round(self.predicted_rebuild_s, 4)
        return d


def decide(setting: str, work: SyncWork, costs: SyncCosts) -> SyncDecision:
    """``live`` or ``rebuild`` for ``work`` under ``RAG_SYNC_STRATEGY=setting``.

    ``auto`` rebuilds only when the prediction says it saves at least ``costs.min_saving_s``; a
    refresh that writes nothing new
    (deletes, moves, metadata) always stays live: a rebuild would copy the whole index for nothing.
    """
    if setting not in STRATEGIES:
        raise ValueError(f"RAG_SYNC_STRATEGY={setting!r}: expected one of {', '.join(STRATEGIES)}")
    live_s, rebuild_s = predict_live_s(work, costs), predict_rebuild_s(work, costs)
    counts = dict(
        rows_in_generation=work.rows_in_generation,
        rows_to_write=work.rows_to_write,
        rows_to_delete=work.rows_to_delete,
        rows_after=work.rows_after,
        predicted_live_s=live_s,
        predicted_rebuild_s=rebuild_s,
    )
    if setting != "auto":
        return SyncDecision(setting, setting, f"RAG_SYNC_STRATEGY={setting}", **counts)
    if work.rows_to_write == 0:
        return SyncDecision("live", setting, "no new rows to write", **counts)
    if live_s - rebuild_s >= costs.min_saving_s:
        return SyncDecision(
            "rebuild", setting, f"predicted rebuild {rebuild_s:.2f}s < live writes {live_s:.2f}s", **counts
        )
    return SyncDecision(
        "live",
        setting,
        f"predicted live writes {live_s:.2f}s vs rebuild {rebuild_s:.2f}s: "
        f"a rebuild would not save {costs.min_saving_s:g}s",
        **counts,
    )


def no_choice(setting: str, reason: str) -> SyncDecision:
    """The decision recorded when the target already is a new generation."""
    return SyncDecision("new", setting, reason)
