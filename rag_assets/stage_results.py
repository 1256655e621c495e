"""What each stage did, as typed results: the manifest, chunk and embed stages return these.

One definition serves every consumer: ``RefreshReport`` sums them, ``record_stage`` stores
``stats()`` in the ``runs`` table, the Dagster assets publish ``metadata()`` (every numeric field,
under its field name: the keys the UI plots are the field names, never a hand-copied list).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def metadata_number(v: object) -> int | float | None:
    """A stage figure as Dagster metadata: booleans as 0/1, ints as they are, floats rounded to 4
    places; None for anything else (lists, dicts, text are not plotted)."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return round(v, 4)
    return None


@dataclass
class StageResult:
    seconds: float = 0.0

    _PRIVATE = frozenset()  # fields kept out of stats() (not JSON, or not meaningful in the runs table)

    def stats(self) -> dict:
        """The result as a JSON-able dict (what the ``runs`` table stores)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._PRIVATE}

    def metadata(self) -> dict[str, int | float]:
        """Numeric fields for Dagster materialization metadata (booleans as 0/1, floats rounded)."""
        values = {f.name: metadata_number(getattr(self, f.name)) for f in fields(self)}
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class ManifestResult(StageResult):
    docs_added: int = 0
    docs_modified: int = 0
    docs_metadata_only: int = 0
    docs_deleted: int = 0
    docs_unchanged: int = 0
    events_applied: int = 0
    events_stale: int = 0
    seconds_scan: float = 0.0
    seconds_manifest: float = 0.0
    changed: bool = False
    errors: list[dict] = field(default_factory=list)  # {"doc_id", "error"}: reported, never raised
    versions: dict[int, str] = field(default_factory=dict)  # per shard: the manifest version written

    _PRIVATE = frozenset({"versions"})

    def metadata(self) -> dict[str, int | float]:
        meta = super().metadata()
        meta["errors"] = len(self.errors)
        return meta


@dataclass
class ChunkResult(StageResult):
    shards_rechunked: int = 0
    docs_rechunked: int = 0
    chunks_written: int = 0
    chunks_deleted: int = 0
    seconds_chunks: float = 0.0


@dataclass
class EmbedResult(StageResult):
    shards_synced: int = 0
    chunks_embedded: int = 0
    tokens_embedded: int = 0
    chunks_reused: int = 0
    tokens_reused: int = 0
    rows_written: int = 0
    rows_deleted: int = 0
    rows_moved: int = 0
    docs_meta_written: int = 0
    doc_rows_deleted: int = 0
    seconds_sync: float = 0.0
    seconds_embed: float = 0.0
    cost_usd: float = 0.0
    generation: int | None = None
    generation_switched: bool = False
    embedding: dict = field(default_factory=dict)  # EmbedStats.as_dict(): requests, retries, latency...
    seconds_copy: float = 0.0  # the rebuild path's copy of the live rows
    sync_strategy: str = ""  # live | rebuild | new (sync_cost.py); "" when the caller chose the generation
    sync_decision: dict = field(default_factory=dict)  # SyncDecision.as_dict()

    def metadata(self) -> dict[str, int | float | str]:
        meta: dict[str, int | float | str] = dict(super().metadata())
        if self.sync_strategy:
            meta["sync_strategy"] = self.sync_strategy
            meta["sync_predicted_live_s"] = round(self.sync_decision.get("predicted_live_s", 0.0), 4)
            meta["sync_predicted_rebuild_s"] = round(self.sync_decision.get("predicted_rebuild_s", 0.0), 4)
        return meta
