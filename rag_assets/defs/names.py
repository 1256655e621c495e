"""The Dagster names of one index: asset keys, job, sensor, schedule, op and resource names.

Several indexes live in one code location, so every name is derived from the index name: asset
keys are prefixed (``["handbook", "chunks"]``), jobs, sensors, schedules and ops get the name as a
prefix (``handbook_full_reindex``), and each index binds its own resources (``rag_handbook``,
``embedder_handbook``). The index named ``default`` (the code location we ship, driven by ``RAG_*``)
keeps the unprefixed names of earlier releases, so an existing Dagster instance keeps its partition
status, materialization history and sensor cursors across the upgrade.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from rag_assets.settings import DEFAULT_INDEX, Settings


@dataclass(frozen=True)
class IndexNames:
    index: str

    @classmethod
    def of(cls, settings: Settings) -> IndexNames:
        return cls(settings.index_name)

    @property
    def legacy(self) -> bool:
        return self.index == DEFAULT_INDEX

    def key(self, base: str) -> dg.AssetKey:
        return dg.AssetKey([base] if self.legacy else [self.index, base])

    def name(self, base: str) -> str:
        """A job, sensor, schedule or op name (unique across the indexes of a code location)."""
        return base if self.legacy else f"{self.index}_{base}"

    @property
    def group(self) -> str:
        return "rag" if self.legacy else f"rag_{self.index}"

    @property
    def rag_resource(self) -> str:
        return "rag" if self.legacy else f"rag_{self.index}"

    @property
    def embedder_resource(self) -> str:
        return "embedder" if self.legacy else f"embedder_{self.index}"
