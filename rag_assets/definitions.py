"""The code location: ``rag_assets.definitions:defs`` (loaded by workspace.yaml and `dagster dev`)."""

import dagster as dg

from rag_assets.defs.assets import build_assets
from rag_assets.defs.jobs import SCHEDULES, consistency_audit, finish_generation, full_reindex_job
from rag_assets.defs.resources import default_resources
from rag_assets.defs.sensors import build_sensors
from rag_assets.defs.snapshot_assets import index_snapshot, snapshot_job, snapshot_schedule
from rag_assets.settings import Settings


def build_defs(settings: Settings | None = None, resources: dict | None = None) -> dg.Definitions:
    """All Dagster objects for one configuration (``RAG_*`` environment by default)."""
    settings = settings or Settings.from_env()
    raw_documents, assets = build_assets(settings)
    return dg.Definitions(
        assets=[raw_documents, *assets, index_snapshot],
        jobs=[full_reindex_job(assets), consistency_audit, finish_generation, snapshot_job],
        schedules=[*SCHEDULES, snapshot_schedule],
        sensors=build_sensors(settings),
        resources=resources or default_resources(),
        # The three stages of a run are a chain: one process per step only added 6-11 s of process
        # starts per refresh (benchmarks/freshness.py). Scale out with more runs, not more steps.
        executor=dg.in_process_executor,
    )


defs = build_defs()
