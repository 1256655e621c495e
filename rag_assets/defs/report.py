"""Write the core refreshes waiting in the index's ``dagster_outbox`` into the Dagster instance.

Each record (``defs/recorded.py``) becomes, per asset, one batch of runless materializations (one
per shard, with the run-wide and the shard's metadata, the code version of the asset's definition,
its data version and its inputs' data versions and event pointers, so the UI's "unsynced" status is
computed as after a run), then the asset check evaluations, each targeting the asset's newest
materialization. A batch of one asset's materializations is one INSERT and one index transaction
(Dagster's batched event writes); a check evaluation is one write each (Dagster does not batch them).

Concurrent reporters (a background one and ``rag-assets record``) serialise on an advisory lock
held on the index's connection, so a record is reported once; a reporter killed between its
Dagster writes and the outbox delete reports those rows again next time (at least once).

    python -m rag_assets.defs.report   # pickled Settings on stdin (what spawn_reporter sends)
"""

from __future__ import annotations

import os
import pickle
import sys
import uuid

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    DEFAULT_DATA_VERSION,
    NULL_EVENT_POINTER,
    compute_logical_data_version,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)
from dagster._core.events import (
    DagsterEvent,
    DagsterEventBatchMetadata,
    DagsterEventType,
    StepMaterializationData,
)
from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID

from rag_assets.dagster_instance import instance as dagster_instance
from rag_assets.settings import Settings

from .names import IndexNames
from .recorded import OUTBOX_DDL, RefreshRecord

OUTBOX_LOCK = "rag.dagster_outbox"
REPORTED_BY_TAG = "rag/reported_by"
RUN_ID_TAG = "rag/run_id"  # the core refresh's run id (the `runs` table), on every reported event
EVENT_BATCH_SIZE = 1000  # events per write; a value already in DAGSTER_EVENT_BATCH_SIZE wins


def drain_outbox(settings: Settings, instance: dg.DagsterInstance | None = None) -> int:
    """Report every waiting record; return how many. Blocks while another reporter drains."""
    from rag_assets.store.db import connect_index

    conn = connect_index(settings)
    try:
        conn.execute(OUTBOX_DDL)
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (OUTBOX_LOCK,))
        rows = conn.execute("SELECT id, record FROM dagster_outbox ORDER BY id").fetchall()
        if not rows:
            return 0
        if instance is None:
            instance = dagster_instance(settings)
            # One short-lived process: a small pool instead of a connection per statement.
            instance.optimize_for_webserver(statement_timeout=0, pool_recycle=-1, max_overflow=4)
        reporter = _Reporter(settings, instance)
        for row_id, record in rows:
            reporter.report(RefreshRecord.from_json(record))
            conn.execute("DELETE FROM dagster_outbox WHERE id = %s", (row_id,))
        return len(rows)
    finally:
        try:
            conn.execute("SELECT pg_advisory_unlock_all()")
        finally:
            conn.close()


class _Reporter:
    def __init__(self, settings: Settings, instance: dg.DagsterInstance):
        import warnings

        from rag_assets.defs.assets import build_assets

        self.instance = instance
        self.names = IndexNames.of(settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.BetaWarning)
            raw, assets = build_assets(settings)
        # The definitions' own code versions and dependencies: what a run of them would record.
        self.code_versions: dict[dg.AssetKey, str | None] = {raw.key: None}
        self.deps: dict[dg.AssetKey, list[dg.AssetKey]] = {raw.key: []}
        for a in assets:
            for key in a.keys:
                self.code_versions[key] = a.code_versions_by_key.get(key)
                self.deps[key] = sorted(a.asset_deps.get(key, set()), key=lambda k: k.to_string())

    def report(self, rec: RefreshRecord) -> None:
        latest: dict[dg.AssetKey, dg.EventLogRecord] = {}
        for stage in rec.stages:
            key = self.names.key(stage.asset)
            inputs = {dep: self._input(dep, latest) for dep in self.deps.get(key, [])}
            code_version = self.code_versions.get(key)
            mats = []
            for partition, shard_meta in stage.per_shard.items():
                tags = {REPORTED_BY_TAG: "cli", RUN_ID_TAG: rec.run_id}
                if code_version is not None:
                    user_version = stage.data_versions.get(partition)
                    version = (
                        dg.DataVersion(user_version)
                        if user_version
                        else compute_logical_data_version(code_version, {k: v for k, (v, _) in inputs.items()})
                    )
                    tags[CODE_VERSION_TAG] = code_version
                    for dep, (dep_version, storage_id) in inputs.items():
                        tags[get_input_data_version_tag(dep)] = dep_version.value
                        tags[get_input_event_pointer_tag(dep)] = str(storage_id) if storage_id else NULL_EVENT_POINTER
                    tags[DATA_VERSION_TAG] = version.value
                    if user_version:
                        tags[DATA_VERSION_IS_USER_PROVIDED_TAG] = "true"
                mats.append(
                    dg.AssetMaterialization(
                        asset_key=key, partition=partition, metadata={**stage.metadata, **shard_meta}, tags=tags
                    )
                )
            self._write_batch(mats)
            rec_latest = self.instance.fetch_materializations(key, limit=1).records
            if rec_latest:
                latest[key] = rec_latest[0]
        for check in rec.checks:
            key = self.names.key(check.asset)
            target = latest.get(key)
            self.instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(
                    asset_key=key,
                    check_name=check.name,
                    passed=check.passed,
                    metadata={**check.metadata, RUN_ID_TAG: rec.run_id},
                    severity=dg.AssetCheckSeverity(check.severity),
                    target_materialization_data=(
                        AssetCheckEvaluationTargetMaterializationData(
                            storage_id=target.storage_id, run_id=target.run_id, timestamp=target.timestamp
                        )
                        if target is not None
                        else None
                    ),
                )
            )

    def _input(self, dep: dg.AssetKey, latest: dict) -> tuple[dg.DataVersion, int | None]:
        """(data version, storage id) of ``dep``'s newest materialization, as a run reads its inputs."""
        record = latest.get(dep)
        if record is None:
            found = self.instance.fetch_materializations(dep, limit=1).records
            record = found[0] if found else None
            if record is not None:
                latest[dep] = record
        if record is None:
            return DEFAULT_DATA_VERSION, None
        version = (record.asset_materialization.tags or {}).get(DATA_VERSION_TAG)
        return (dg.DataVersion(version) if version else DEFAULT_DATA_VERSION), record.storage_id

    def _write_batch(self, mats: list[dg.AssetMaterialization]) -> None:
        """One asset's materializations in one batch (one INSERT, one index transaction)."""
        batch_id = uuid.uuid4().hex
        unset = "DAGSTER_EVENT_BATCH_SIZE" not in os.environ
        if unset:
            os.environ["DAGSTER_EVENT_BATCH_SIZE"] = str(EVENT_BATCH_SIZE)
        try:
            for i, mat in enumerate(mats):
                self.instance.report_dagster_event(
                    DagsterEvent(
                        event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
                        event_specific_data=StepMaterializationData(mat),
                        job_name=RUNLESS_JOB_NAME,
                    ),
                    run_id=RUNLESS_RUN_ID,
                    batch_metadata=DagsterEventBatchMetadata(batch_id, i == len(mats) - 1),
                )
        finally:
            if unset:
                os.environ.pop("DAGSTER_EVENT_BATCH_SIZE", None)


def main() -> int:
    settings = pickle.loads(sys.stdin.buffer.read())
    n = drain_outbox(settings)
    print(f"recorded {n} refresh(es) in the Dagster instance", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
