"""Sensors: the source sensor (folder scans), the inbox sensor (webhooks) and the automation sensor.

Both source sensors are *runless*: they record materializations of ``raw_documents`` for the
changed shards and let declarative automation launch the runs, grouped into range runs. They never
use run keys, so a document edited A → B → A is re-indexed each time (run keys are remembered
forever; a content-hash run key would silently drop the third edit).
"""

import hashlib
import json
import time

import dagster as dg

from rag_assets.manifest import shard_key, shard_of
from rag_assets.settings import Settings
from rag_assets.sources import Source, open_source
from rag_assets.store.db import connect_index
from rag_assets.store.source_binding import bound_folder

from .names import IndexNames


def shard_stat_versions(source: Source, n_shards: int) -> tuple[dict[int, str], dict[int, int]]:
    """Per shard: a hash of its documents' change tokens — the fast path's view: a file's (path,
    size, mtime), an object's (key, size, LastModified, ETag/version) — and a document count.

    Any edit, add, delete, rename or touch changes the version of the shards involved, without
    reading a single document (the manifest stage decides later whether content really changed).
    A folder's hash input is as it always was (no token), so an upgrade reports no shard changed.
    """
    hashes: dict[int, hashlib._Hash] = {s: hashlib.sha256() for s in range(n_shards)}
    counts = dict.fromkeys(range(n_shards), 0)
    for doc_id, st in sorted(source.scan().stats.items()):
        s = shard_of(doc_id, n_shards)
        token = "" if st.token is None else f"\0{st.token}"
        hashes[s].update(f"{doc_id}\0{st.size}\0{st.mtime_ns}{token}\n".encode("utf-8", "surrogatepass"))
        counts[s] += 1
    return {s: h.hexdigest()[:24] for s, h in hashes.items()}, counts


def complete_building_generation(conn) -> int | None:
    """The newest building generation whose every shard reflects the current chunks, if any."""
    from rag_assets.store.serving import _GEN_COLS, Generation, lagging_serving_shards

    rows = conn.execute(
        f"SELECT {_GEN_COLS} FROM generations WHERE state = 'building' ORDER BY id DESC"
    ).fetchall()
    from rag_assets.quality_gate import refusal

    for row in rows:
        gen = Generation(*row)
        if refusal(conn, gen.id) is None and not lagging_serving_shards(conn, gen):
            return gen.id  # (a switch the quality gate refused is not requested again)
    return None


def pending_inbox(conn) -> list[tuple[int, int, float]]:
    """(shard, newest pending seq, age in seconds of the oldest pending event) for unapplied events."""
    return conn.execute(
        """SELECT shard, max(seq), extract(epoch FROM now() - min(received_at))
           FROM inbox WHERE applied_at IS NULL GROUP BY shard ORDER BY shard"""
    ).fetchall()


def build_sensors(settings: Settings, finish_generation: dg.JobDefinition | None = None) -> list:
    """The source, inbox, generation and automation sensors of one index."""
    names = IndexNames.of(settings)
    if finish_generation is None:
        from .jobs import build_jobs

        finish_generation = build_jobs(names)[1]
    raw_key = names.key("raw_documents")

    @dg.sensor(
        name=names.name("source_sensor"),
        required_resource_keys={names.rag_resource},
        minimum_interval_seconds=settings.source_sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Scans the source folder by file stats and reports the shards whose files changed (runless).",
    )
    def source_sensor(context: dg.SensorEvaluationContext, **_resources) -> dg.SensorResult | dg.SkipReason:
        settings = getattr(context.resources, names.rag_resource).settings()
        conn = connect_index(settings)
        try:
            bound = bound_folder(conn, settings)  # the index's own folder, never a default path
        finally:
            conn.close()
        if bound is None:
            return dg.SkipReason("this index has no folder source (webhook documents only)")
        source = open_source(str(bound.root), bound.include, bound.exclude, settings)
        versions, counts = shard_stat_versions(source, settings.shards)
        last = json.loads(context.cursor) if context.cursor else {}
        changed = [s for s in range(settings.shards) if last.get(shard_key(s)) != versions[s]]
        if not changed:
            return dg.SkipReason("no shard changed")
        events = [
            dg.AssetMaterialization(
                asset_key=raw_key,
                partition=shard_key(s),
                tags={"dagster/data_version": versions[s]},
                metadata={"files": counts[s]},
            )
            for s in changed
        ]
        cursor = {shard_key(s): v for s, v in versions.items()}  # bounded by the shard count, not the corpus
        return dg.SensorResult(asset_events=events, cursor=json.dumps(cursor, separators=(",", ":")))

    @dg.sensor(
        name=names.name("inbox_sensor"),
        required_resource_keys={names.rag_resource},
        minimum_interval_seconds=settings.inbox_sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Reports the shards that have new webhook events in the inbox (runless).",
    )
    def inbox_sensor(context: dg.SensorEvaluationContext, **_resources) -> dg.SensorResult | dg.SkipReason:
        """Cursor: the high-water mark of reported inbox sequence numbers, plus when each shard was
        last reported. A shard is reported when it has events above the mark, and reported again if
        its events are still unapplied a while later (an event whose insert committed out of sequence
        order, or a failed run), so no acknowledged event can be stranded."""
        cur = json.loads(context.cursor) if context.cursor else {"hw": 0, "at": {}}
        conn = connect_index(getattr(context.resources, names.rag_resource).settings())
        try:
            rows = pending_inbox(conn)
        finally:
            conn.close()
        now = time.time()
        retry_after = max(60, 4 * settings.automation_interval_s)
        report = [
            (s, mx) for s, mx, _age in rows if mx > cur["hw"] or now - cur["at"].get(str(s), 0) > retry_after
        ]
        if not report:
            return dg.SkipReason("no new inbox events")
        hw = max([cur["hw"], *(mx for _, mx in report)])
        at = {k: v for k, v in cur["at"].items() if now - v < 3600}
        at.update({str(s): now for s, _ in report})
        events = [
            dg.AssetMaterialization(
                asset_key=raw_key,
                partition=shard_key(s),
                tags={"dagster/data_version": f"inbox-{mx}"},
                metadata={"inbox_seq": mx},
            )
            for s, mx in report
        ]
        return dg.SensorResult(
            asset_events=events, cursor=json.dumps({"hw": hw, "at": at}, separators=(",", ":"))
        )

    @dg.sensor(
        name=names.name("generation_sensor"),
        required_resource_keys={names.rag_resource},
        job=finish_generation,
        minimum_interval_seconds=settings.source_sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests finish_generation when a building generation has every shard synced but was never switched.",
    )
    def generation_sensor(context: dg.SensorEvaluationContext, **_resources) -> dg.RunRequest | dg.SkipReason:
        conn = connect_index(getattr(context.resources, names.rag_resource).settings())
        try:
            gen = complete_building_generation(conn)
        finally:
            conn.close()
        if gen is None:
            return dg.SkipReason("no complete building generation")
        active = context.instance.get_runs(
            dg.RunsFilter(
                job_name=finish_generation.name,
                statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
            ),
            limit=1,
        )
        if active:
            return dg.SkipReason(f"finish_generation already running for generation {gen}")
        # The run key repeats every 10 minutes while the generation stays unfinished (a failed or
        # killed finish is retried), never within that window (no duplicate requests per tick).
        return dg.RunRequest(run_key=f"finish-{gen}-{int(time.time() // 600)}", tags={"rag/generation": str(gen)})

    automation_sensor = dg.AutomationConditionSensorDefinition(
        names.name("rag_automation"),
        target=dg.AssetSelection.groups(names.group),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=settings.automation_interval_s,
        description="Materializes only the stale shards (new source data or a new chunker/embedder version), in range runs.",
    )

    return [source_sensor, inbox_sensor, generation_sensor, automation_sensor]
