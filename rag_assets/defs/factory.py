"""``build_rag_index_defs``: every Dagster object of one index, for any project.

The component (``rag_assets.RagIndex``) and the code location we ship both call it. An index is
one ``Settings``: its name prefixes asset keys and names (``defs/names.py``), its Postgres schema
holds its tables, and its resources carry its settings without secrets. Definitions of several
indexes merge (``dg.Definitions.merge``) because no key, name or resource key is shared.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import dagster as dg

from rag_assets.settings import Settings, settings_from_attributes


def build_rag_index_defs(
    name: str | None = None,
    *,
    settings: Settings | None = None,
    resources: dict[str, Any] | None = None,
    **attributes: Any,
) -> dg.Definitions:
    """The assets, checks, jobs, sensors and schedules of one index.

    Either ``settings`` (a ``Settings``), or the component's attributes as keyword arguments
    (``source={"path": "docs"}``, ``embedder={"provider": "openai", ...}``, ``shards=16``...), which
    go through the same model as the ``RAG_*`` variables. Loading reads no environment variable,
    needs no secret and makes no network call: secrets are read by the runs (``Settings.with_secrets``).
    ``resources`` replaces the index's own resources (tests, the CLI's in-process runs).
    """
    if settings is None:
        settings = settings_from_attributes({"name": name or "default", **attributes})
    elif name is not None and name != settings.index_name:
        settings = replace(settings, index_name=name)
        settings.validate()
    elif attributes:
        raise TypeError("pass either settings or attributes, not both")
    from rag_assets import registry
    from rag_assets.defs.assets import build_assets
    from rag_assets.defs.jobs import build_jobs, full_reindex_job
    from rag_assets.defs.names import IndexNames
    from rag_assets.defs.resources import index_resources
    from rag_assets.defs.sensors import build_sensors
    from rag_assets.defs.snapshot_assets import build_snapshot_defs

    registry.register(settings)
    names = IndexNames.of(settings)
    raw_documents, assets = build_assets(settings)
    audit_job, finish_job, schedules = build_jobs(names)
    snapshot, snapshot_job, snapshot_schedule = build_snapshot_defs(names)
    return dg.Definitions(
        assets=[raw_documents, *assets, snapshot],
        jobs=[full_reindex_job(assets, names), audit_job, finish_job, snapshot_job],
        schedules=[*schedules, snapshot_schedule],
        sensors=build_sensors(settings, finish_job),
        resources=resources or index_resources(settings),
        # The three stages of a run are a chain: one process per step only added 6-11 s of process
        # starts per refresh (benchmarks/freshness.py). Scale out with more runs, not more steps.
        executor=dg.in_process_executor,
    )
