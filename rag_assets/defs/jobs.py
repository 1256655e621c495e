"""Jobs and schedules of one index: the full reindex (a backfill of all shards), the consistency
audit, and finishing a complete building generation."""

import dagster as dg

from rag_assets.audit import audit

from .names import IndexNames
from .resources import stage_context_from

REBUILD_TAG = {"rag/mode": "rebuild"}


# A backfill of this job over all shards is a full reindex: every file re-read, every document
# re-chunked, a new generation filled (vectors from the cache unless the embedder changed) and
# switched to when complete. Backfills run as range runs (BackfillPolicy.single_run).
def full_reindex_job(assets: list[dg.AssetsDefinition], names: IndexNames | None = None):
    names = names or IndexNames("default")
    return dg.define_asset_job(
        names.name("full_reindex"),
        selection=dg.AssetSelection.assets(*assets),
        tags=REBUILD_TAG,  # a run tag, not run config: backfills of the job carry it to every run
        description="Full reindex: backfill all shards (UI: Launch backfill → all partitions).",
    )


def build_jobs(names: IndexNames) -> tuple[dg.JobDefinition, dg.JobDefinition, list[dg.ScheduleDefinition]]:
    """The audit and finish-generation jobs of one index, and the audit's daily schedule."""
    keys = {names.rag_resource, names.embedder_resource}

    @dg.op(
        name=names.name("audit_and_repair"),
        required_resource_keys=keys,
        description="Compare manifest, chunks, serving rows and cached vectors; repair drifted shards.",
    )
    def audit_and_repair(context: dg.OpExecutionContext) -> dict:
        ctx = stage_context_from(context, names)
        try:
            report = audit(ctx, repair=True)
        finally:
            ctx.conn.close()
        found = report["found"]
        context.log.info(
            f"audit found {found} in shards {report['shards_affected']}; repaired={report['repaired']}"
        )
        context.add_output_metadata(
            {
                **{f"found_{k}": v for k, v in found.items()},
                "shards_affected": len(report["shards_affected"]),
                "repaired": report["repaired"],
                "seconds": report["seconds"],
            }
        )
        if report["shards_affected"] and not report["repaired"]:
            raise dg.Failure(
                description=f"drift remains after repair: {report.get('remaining') or report.get('note')}"
            )
        return report

    @dg.job(
        name=names.name("consistency_audit"),
        description="Consistency audit: finds and repairs missing, orphaned and stale serving rows.",
        tags={"rag/index": names.index},
    )
    def consistency_audit():
        audit_and_repair()

    @dg.op(
        name=names.name("finish_building_generation"),
        required_resource_keys={names.rag_resource},
        description="Index, verify and switch to a building generation whose every shard is synced.",
    )
    def finish_building_generation(context: dg.OpExecutionContext) -> bool:
        from rag_assets.pipeline import finish_generation

        ctx = stage_context_from(context, names)
        try:
            switched = finish_generation(ctx)
        finally:
            ctx.conn.close()
        context.add_output_metadata({"switched": switched})
        context.log.info("switched to the finished generation" if switched else "no complete building generation")
        return switched

    @dg.job(
        name=names.name("finish_generation"),
        description=(
            "Finishes a complete building generation that no shard run will touch again (a run killed during its "
            "HNSW build, or between its last shard sync and the switch). Requested by generation_sensor."
        ),
        tags={"rag/index": names.index},
    )
    def finish_generation():
        finish_building_generation()

    audit_schedule = dg.ScheduleDefinition(
        name=names.name("consistency_audit_daily"),
        job=consistency_audit,
        cron_schedule="0 4 * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    return consistency_audit, finish_generation, [audit_schedule]
