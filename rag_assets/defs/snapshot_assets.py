"""The ``index_snapshot`` asset: a versioned, content-addressed snapshot of the live index.

Unpartitioned and downstream of every embeddings shard; materialized by a daily schedule (or on
demand). Unchanged shards reuse the previous snapshot's objects, so a daily snapshot of a 1%
change writes about 1% of the bytes.
"""

import time

import dagster as dg

from rag_assets.snapshots import create_snapshot, prune_snapshots, store_for_settings
from rag_assets.store.db import connect_index

from .names import IndexNames


def build_snapshot_defs(names: IndexNames):
    """The snapshot asset of one index, its job and its daily schedule."""

    @dg.asset(
        key=names.key("index_snapshot"),
        deps=[names.key("embeddings")],
        required_resource_keys={names.rag_resource},
        group_name=names.group,
        kinds={"s3", "parquet"},
        description=(
            "Immutable snapshot of the live generation (manifest, chunks and vectors as content-addressed Parquet "
            "objects plus a JSON record with checksums) in RAG_SNAPSHOT_URI (a folder or s3://). Restore with "
            "`rag-assets snapshot restore ID`."
        ),
    )
    def index_snapshot(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        settings = getattr(context.resources, names.rag_resource).settings()
        t0 = time.perf_counter()
        conn = connect_index(settings)
        store = store_for_settings(settings)
        try:
            rec = create_snapshot(conn, store, note=f"dagster run {context.run.run_id}")
        finally:
            conn.close()
        pruned = prune_snapshots(store, settings.snapshot_keep)  # retention: RAG_SNAPSHOT_KEEP newest
        context.log.info(f"retention kept {settings.snapshot_keep} snapshots: {pruned}")
        context.log.info(f"snapshot {rec.get('id')} written to {settings.snapshot_target}")
        numeric = {k: v for k, v in rec.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return dg.MaterializeResult(
            metadata={
                **numeric,
                "snapshot_id": str(rec.get("id")),
                "target": settings.snapshot_target,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )

    snapshot_job = dg.define_asset_job(
        names.name("snapshot_index"), selection=dg.AssetSelection.assets(index_snapshot)
    )
    snapshot_schedule = dg.ScheduleDefinition(
        name=names.name("snapshot_daily"),
        job=snapshot_job,
        cron_schedule="0 2 * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    return index_snapshot, snapshot_job, snapshot_schedule
