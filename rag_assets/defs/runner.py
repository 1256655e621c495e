"""``rag-assets index --dagster-run``: the stale shards materialized as in-process Dagster runs.

(Plain ``rag-assets index`` runs the core and records it as runless events instead: ``recorded.py``,
decision 36; this path keeps a run page per refresh at ~1-2 s of orchestration per run.)

The stale shards are found exactly as the sensors would (file stats against the manifest, plus
any shard whose chunk or serving stage is behind, plus pending webhook events). Nothing stale →
no run at all and Dagster is not even imported. Otherwise one in-process run per contiguous shard
range, recorded in the same Dagster instance ``dagster dev`` uses, so CLI refreshes appear in the
UI as materializations with their metadata.

Quiet by default: the run's loggers are only :func:`_progress_logger` (Dagster's events become
progress bars on a terminal), not Dagster's console logger, whose DEBUG line per event is what
``--verbose`` adds back. The events themselves are written to the instance either way: Dagster's
log manager hands every event to the instance's event-log handler independently of the loggers
configured for the run, so the UI shows the same materializations, metadata and asset checks.
"""

import contextlib
import logging
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path

from rag_assets.dagster_instance import instance as dagster_instance
from rag_assets.pipeline import (
    IndexingError,
    RefreshReport,
    StageContext,
    _merge_embedding,
    check_deletes,
    finish_generation,
    finish_report,
    plan_scan,
)
from rag_assets.progress import StageBars
from rag_assets.settings import Settings
from rag_assets.tokens import preload as preload_tokenizer

# Dagster writes a range run's per-partition asset events (materializations, planned events) in
# batches of this many instead of one INSERT + NOTIFY + index transaction each (Dagster's
# DAGSTER_EVENT_BATCH_SIZE, off by default in OSS). Measured by benchmarks/dagster_overhead.py on the
# Django docs: full index through Dagster 15.1 s → 12.2 s, 5.0 → 5.1 10.9 s → 7.3 s. A value already
# set in the environment wins.
DAGSTER_EVENT_BATCH_SIZE = "100"
PARTITION_RANGE_START = "dagster/asset_partition_range_start"
PARTITION_RANGE_END = "dagster/asset_partition_range_end"
# The job name dg.materialize gives its runs: CLI runs keep appearing under it in the UI.
EPHEMERAL_JOB_NAME = "__ephemeral_asset_job__"
PROGRESS_LOGGER = "rag_progress"


def contiguous_ranges(shards: list[int], max_runs: int = 3) -> list[tuple[int, int]]:
    """[1, 2, 3, 7, 9, 10] → [(1, 3), (7, 7), (9, 10)]: one range run each.

    More than ``max_runs`` ranges collapse into one run from the lowest to the highest shard: a run
    costs ~0.5 s of orchestration, while a shard with nothing to do costs a few milliseconds (every
    stage is level-triggered and finds it already in step).
    """
    out: list[tuple[int, int]] = []
    for s in sorted(shards):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    if len(out) > max_runs:
        out = [(out[0][0], out[-1][1])]
    return out


def index_via_dagster(
    settings: Settings,
    path: Path,
    *,
    full: bool = False,
    rehash: bool = False,
    allow_deletes: bool = False,
    change_source: bool = False,
    verbose: bool = False,
    bars: StageBars | None = None,
) -> RefreshReport:
    """Refresh the stale shards as Dagster runs. ``verbose`` adds Dagster's console event log on
    stderr; ``bars`` (disabled when None) shows documents scanned, chunks embedded, shards synced."""
    t0 = time.perf_counter()
    bars = bars or StageBars(enabled=False)
    settings = replace(settings, source_path=Path(path).resolve())
    ctx = StageContext.create(settings, kind="cli")
    try:
        source = ctx.source(path, change_source=change_source)
        plan = plan_scan(ctx.conn, source, settings.shards, rehash=rehash or full)
        check_deletes(plan, source, settings.max_delete_fraction, allow=allow_deletes)
        pending = set(range(settings.shards)) if full else ctx.pending_shards(plan, ctx.target())
        rep = RefreshReport(seconds_scan=plan.seconds)
        rep.errors.extend({"doc_id": p, "error": r} for p, r in plan.scan.errors)
        scanned = len(
            plan.scan.stats
        )  # the files the scan found (stat only; the changed ones are read later)
        bars.start("scan", scanned)
        bars.advance("scan", scanned)
        bars.finish("scan")
        run_ids: list[str] = []
        if pending:
            # The tokenizer (~0.3-1 s to load) is needed as soon as the assets are built: load it
            # while Dagster is imported. Not before: a refresh with nothing stale never needs it.
            preload_tokenizer()
            run_ids = _materialize(
                settings,
                sorted(pending),
                full=full,
                rehash=rehash,
                allow_deletes=allow_deletes,
                verbose=verbose,
                bars=bars,
            )
        for stage, stats in ctx.conn.execute(
            "SELECT stage, stats FROM runs WHERE run_id = ANY(%s) ORDER BY id", (run_ids,)
        ).fetchall():
            rep.merge(stats)
            if stage == "embeddings":
                rep.embedding = _merge_embedding(rep.embedding, stats.get("embedding") or {})
        rep.shards_refreshed = len(pending)
        # A building generation whose shards are all synced (a run killed during its HNSW build, or
        # between its last sync and the switch) gets no shard run: finish it here.
        rep.generation_switched = finish_generation(ctx) or rep.generation_switched
        finish_report(ctx, rep)
        rep.seconds = time.perf_counter() - t0
        return rep
    finally:
        ctx.conn.close()


def _materialize(
    settings: Settings,
    shards: list[int],
    *,
    full: bool,
    rehash: bool,
    allow_deletes: bool = False,
    verbose: bool = False,
    bars: StageBars | None = None,
) -> list[str]:
    import warnings

    import dagster as dg

    from rag_assets.defs.assets import build_assets
    from rag_assets.defs.resources import resources_for
    from rag_assets.manifest import shard_key

    bars = bars or StageBars(enabled=False)
    instance = dagster_instance(settings)
    # dagster-postgres opens a new connection for every statement (NullPool: a long-lived process
    # must not hoard connections); a one-shard run makes ~140 of them, ~1 s on the embedded server.
    # A CLI process lives for one refresh, so it keeps a small pool, as dagster-webserver does.
    instance.optimize_for_webserver(statement_timeout=0, pool_recycle=-1, max_overflow=4)
    with warnings.catch_warnings():
        if not verbose:  # Dagster's BetaWarning for backfill_policy: a note for developers, not users
            warnings.simplefilter("ignore", dg.BetaWarning)
        raw_documents, assets = build_assets(settings)
    resources = resources_for(settings)
    conf = {"rebuild": full, "rehash": rehash, "allow_deletes": allow_deletes}
    loggers = {PROGRESS_LOGGER: {}, **({"console": {"config": {"log_level": "DEBUG"}}} if verbose else {})}
    run_config = {"ops": {a.op.name: {"config": conf} for a in assets}, "loggers": loggers}
    # dg.materialize, spelled out so the run can carry our progress logger beside Dagster's console one.
    job = dg.Definitions(
        jobs=[dg.define_asset_job(name=EPHEMERAL_JOB_NAME)],
        assets=[*assets],
        resources=resources,
        loggers={"console": dg.colored_console_logger, PROGRESS_LOGGER: _progress_logger(bars)},
    ).resolve_job_def(EPHEMERAL_JOB_NAME)
    for stage in ("document_manifest", "chunks", "embedded", "embeddings"):
        bars.start(stage, None if stage == "embedded" else len(shards))
    token = uuid.uuid4().hex
    run_ids = []
    for lo, hi in contiguous_ranges(shards):
        for s in range(lo, hi + 1):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    asset_key=raw_documents.key, partition=shard_key(s), tags={"rag/reported_by": "cli"}
                )
            )
        tags = {"rag/trigger": "cli", "rag/rebuild": token}
        kw: dict = {}
        if lo == hi:
            kw["partition_key"] = shard_key(lo)
        else:
            tags.update({PARTITION_RANGE_START: shard_key(lo), PARTITION_RANGE_END: shard_key(hi)})
        with _event_batching():
            result = job.execute_in_process(
                run_config=run_config, instance=instance, tags=tags, raise_on_error=False, **kw
            )
        run_ids.append(result.run_id)
        if not result.success:
            raise _run_failure(result, f"refresh of shards {shard_key(lo)}..{shard_key(hi)} failed")
    return run_ids


class _EventsToBars(logging.Handler):
    """Advance the stage bars from a run's asset materializations (one per shard and stage).

    A range run's step reports the same run-wide metadata on each of its partitions, so
    ``chunks_embedded`` is counted once per step.
    """

    def __init__(self, bars: StageBars):
        super().__init__(level=logging.DEBUG)
        self.bars = bars
        self.steps_counted: set[tuple[str, str | None]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        # Runs inside the step that logged the event: a progress bar must never fail a refresh.
        try:
            self._advance(record)
        except Exception:  # noqa: BLE001 - cosmetic output; the bars stop, the run goes on
            self.bars.enabled = False

    def _advance(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        if event is None or not event.is_step_materialization:
            return
        stage = event.asset_key.path[-1]
        if stage not in ("document_manifest", "chunks", "embeddings"):
            return
        self.bars.advance(stage)
        step = (meta.get("run_id"), event.step_key)
        if stage == "embeddings" and step not in self.steps_counted:
            self.steps_counted.add(step)
            value = event.event_specific_data.materialization.metadata.get("chunks_embedded")
            self.bars.advance("embedded", int(getattr(value, "value", 0) or 0))


def _progress_logger(bars: StageBars):
    """A Dagster logger that prints nothing: it feeds :class:`_EventsToBars`."""
    import dagster as dg

    def init(_context) -> logging.Logger:
        logger = logging.Logger(
            "rag_assets.progress", level=logging.DEBUG
        )  # unregistered: no root propagation
        logger.propagate = False
        logger.addHandler(_EventsToBars(bars))
        return logger

    return dg.LoggerDefinition(init, description="progress bars for the rag-assets CLI")


def _run_failure(result, what: str) -> IndexingError:
    """One error naming the root cause of a failed in-process run, not Dagster's wrapper.

    Dagster wraps the asset's exception ("Error occurred while executing op ...") and keeps ours as
    its cause: the message is the innermost cause's, and the failure kind (exit code) follows the
    class names along the chain (``rag_assets/failures.py``).
    """
    from rag_assets.failures import kind_of_class_names

    parts, kinds = [], []
    for ev in result.get_step_failure_events():
        err = ev.step_failure_data.error if ev.step_failure_data else None
        if err is None:
            parts.append(str(ev.message))
            continue
        chain = []
        while err is not None:
            chain.append(err)
            err = err.cause or err.context
        root = chain[-1]
        kinds.append(kind_of_class_names([c.cls_name for c in reversed(chain) if c.cls_name]))
        parts.append(f"in {ev.step_key}: {root.message.strip()}")
    exc = IndexingError(f"{what} {'; '.join(parts)}")
    exc.kind = next((k for k in kinds if k), "indexing")  # type: ignore[attr-defined]
    return exc


@contextlib.contextmanager
def _event_batching():
    """Batched asset-event writes for one in-process run, unless the environment already decides.

    Dagster reads DAGSTER_EVENT_BATCH_SIZE at each event; setting it only around our own runs keeps
    the rest of the process (tests, an embedding application) on whatever it chose.
    """
    if "DAGSTER_EVENT_BATCH_SIZE" in os.environ:
        yield
        return
    os.environ["DAGSTER_EVENT_BATCH_SIZE"] = DAGSTER_EVENT_BATCH_SIZE
    try:
        yield
    finally:
        os.environ.pop("DAGSTER_EVENT_BATCH_SIZE", None)
