"""The CLI's default refresh: the core's stages, then their record in the Dagster instance.

``rag-assets index`` runs ``Indexer.refresh`` (the same code as ``--core``, so the index is the
core's by construction) and then records what it did in the Dagster instance as *runless* asset
events: one materialization per refreshed shard and asset, with the metadata, data versions and
code versions a run would have written, and the asset check evaluations of the refreshed shards.
The UI's partition status, materialization metadata, plots and asset checks are those of a run;
what a run adds and this does not is the run page (run record, step timeline, compute logs).
Decision 36 in docs/architecture.md has the profile behind it.

This module never imports Dagster: importing it costs ~2.5 s of CPU, more than the whole one-document
refresh. The record is built here (plain SQL on the index's connection), written to the index's
``dagster_outbox`` table in the refresh's process, and written into the Dagster instance by
:mod:`rag_assets.defs.report`, either in this process (``record="wait"``) or in a detached child
process (``record="background"``, the CLI's default: the command returns when the index is
updated, the UI catches up about a Dagster import later). The outbox makes the record durable: a
reporter that dies leaves its rows for the next one (``rag-assets record`` drains it by hand).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from rag_assets.pipeline import Indexer, RefreshReport
from rag_assets.settings import Settings
from rag_assets.stage_results import ChunkResult, EmbedResult, ManifestResult, metadata_number

RECORD_MODES = ("background", "wait", "off")
OUTBOX_DDL = """CREATE TABLE IF NOT EXISTS dagster_outbox (
    id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    record jsonb NOT NULL)"""
# The serving checks' severities as the assets declare them (defs/assets.py: rows_match_chunks blocks).
CHECK_SEVERITY = {"manifest_matches_source": "WARN", "quality_gate": "WARN"}


@dataclass
class StageRecord:
    """One asset's events of a refresh: the run-wide metadata, and per shard its own."""

    asset: str  # the asset's base name (document_manifest, chunks, embeddings, raw_documents)
    metadata: dict = field(default_factory=dict)
    per_shard: dict[str, dict] = field(default_factory=dict)  # partition key -> metadata
    data_versions: dict[str, str] = field(default_factory=dict)  # partition key -> data version


@dataclass
class CheckRecord:
    asset: str
    name: str
    passed: bool
    metadata: dict = field(default_factory=dict)
    severity: str = "ERROR"


@dataclass
class RefreshRecord:
    """What one core refresh recorded into the outbox (JSON), and the reporter reads back."""

    index: str
    run_id: str
    shards: list[int]
    stages: list[StageRecord]
    checks: list[CheckRecord]

    @classmethod
    def from_json(cls, d: dict) -> RefreshRecord:
        return cls(
            index=d["index"],
            run_id=d["run_id"],
            shards=list(d["shards"]),
            stages=[StageRecord(**s) for s in d["stages"]],
            checks=[CheckRecord(**c) for c in d["checks"]],
        )


def index_recorded(
    settings: Settings,
    path,
    *,
    full: bool = False,
    rehash: bool = False,
    allow_deletes: bool = False,
    change_source: bool = False,
    progress: bool = False,
    record: str = "background",
    timings: dict | None = None,
) -> RefreshReport:
    """Refresh through the core, then record the refresh for Dagster (see the module docstring).

    ``timings`` (benchmarks) receives the wall and CPU seconds of the core's part (``core_s``,
    ``core_cpu_s``) and of the record's (``record_s``, ``record_cpu_s``: build, outbox, and with
    ``record="wait"`` the Dagster writes).
    """
    import time

    if record not in RECORD_MODES:
        raise ValueError(f"record must be one of {RECORD_MODES}, not {record!r}")
    t0, c0 = time.perf_counter(), time.process_time()
    idx = Indexer(settings)
    try:
        rep = idx.refresh(
            path,
            full=full,
            rehash=rehash,
            allow_deletes=allow_deletes,
            change_source=change_source,
            progress=progress,
        )
        t1, c1 = time.perf_counter(), time.process_time()
        rec = build_record(idx, rep) if record != "off" else None
        if rec is not None:
            write_outbox(idx.conn, rec)
    finally:
        idx.close()
    if rec is not None:
        if record == "wait":
            from rag_assets.defs.report import drain_outbox

            drain_outbox(settings)
        else:
            spawn_reporter(settings)
    if timings is not None:
        t2, c2 = time.perf_counter(), time.process_time()
        timings.update(core_s=t1 - t0, core_cpu_s=c1 - c0, record_s=t2 - t1, record_cpu_s=c2 - c1)
    return rep


def build_record(idx: Indexer, rep: RefreshReport) -> RefreshRecord | None:
    """The events of the refresh just made by ``idx`` (None when it refreshed no shard).

    The refreshed shards are those of its ``runs`` row (every stale shard, as a run's partitions).
    Run-wide metadata is the report's figures under each stage's field names (stage_results.py: the
    keys the assets publish); the per-shard figures and the checks are read now, on the state the
    refresh left.
    """
    from rag_assets.checks import manifest_matches_source, serving_checks
    from rag_assets.manifest import shard_key
    from rag_assets.store.manifest_store import manifest_versions

    ctx = idx.ctx
    conn = ctx.conn
    row = conn.execute(
        "SELECT shards FROM runs WHERE run_id = %s AND stage = 'refresh' ORDER BY id DESC LIMIT 1",
        (ctx.run_id,),
    ).fetchone()
    if not row or not row[0]:
        return None
    shards = sorted(int(s) for s in row[0])
    keys = {s: shard_key(s) for s in shards}
    d = rep.as_dict()

    docs = dict(conn.execute(
        "SELECT shard, count(*) FROM manifest WHERE shard = ANY(%s) GROUP BY shard", (shards,)
    ).fetchall())
    versions = {s: v for s, v in manifest_versions(conn).items() if s in keys}
    chunk_rows = conn.execute(
        "SELECT s.shard, count(c.shard), max(st.chunks_version) FROM unnest(%s::int[]) AS s(shard) "
        "LEFT JOIN chunks c ON c.shard = s.shard LEFT JOIN shard_state st ON st.shard = s.shard "
        "GROUP BY s.shard",
        (shards,),
    ).fetchall()
    chunks_per_shard = {int(s): int(n) for s, n, _ in chunk_rows}
    chunks_versions = {int(s): (v or "")[:64] for s, _, v in chunk_rows}

    manifest_meta = _stage_metadata(d, ManifestResult)
    manifest_meta["errors"] = len(rep.errors)
    manifest_meta["shards_in_run"] = len(shards)
    chunks_meta = _stage_metadata(d, ChunkResult)
    chunks_meta.update(chunks_total=sum(chunks_per_shard.values()), shards_in_run=len(shards))
    emb = rep.embedding or {}
    needed = rep.chunks_embedded + rep.chunks_reused
    emb_meta = _stage_metadata(d, EmbedResult)
    emb_meta.update(
        {k: d[k] for k in ("docs_added", "docs_modified", "docs_metadata_only", "docs_deleted")},
        chunks_total=rep.chunks_total,
        cache_hit_rate=round(rep.chunks_reused / needed, 4) if needed else 1.0,
        embed_seconds=round(rep.seconds_embed, 4),
        embed_requests=emb.get("requests") or 0,
        embed_retries=emb.get("retries") or 0,
        throttled_429=emb.get("throttled_429") or 0,
        rate_limit_wait_s=emb.get("rate_limit_wait_s") or 0.0,
        embed_batch_splits=emb.get("batch_splits") or 0,
        cost_avoided_usd=round(rep.cost_avoided_usd, 6),
        shards_in_run=len(shards),
    )
    if emb.get("latency_p50_ms") is not None:
        emb_meta["latency_p50_ms"] = round(emb["latency_p50_ms"], 2)
        emb_meta["latency_p95_ms"] = round(emb["latency_p95_ms"], 2)
    stages = [
        StageRecord("raw_documents", per_shard={k: {} for k in keys.values()}),
        StageRecord(
            "document_manifest",
            manifest_meta,
            {k: {"shard_documents": docs.get(s, 0), "manifest_version": versions.get(s, "")} for s, k in keys.items()},
            {k: versions[s] for s, k in keys.items() if versions.get(s)},
        ),
        StageRecord(
            "chunks",
            chunks_meta,
            {k: {"shard_chunks": chunks_per_shard.get(s, 0)} for s, k in keys.items()},
            {k: chunks_versions[s] for s, k in keys.items() if chunks_versions.get(s)},
        ),
        StageRecord("embeddings", emb_meta, {k: {} for k in keys.values()}),
    ]

    source = ctx.source()
    checks = [manifest_matches_source(conn, source, shards, sample=100)]
    checks_for = ["document_manifest"]
    for r in serving_checks(conn, ctx.target(), shards):
        checks.append(r)
        checks_for.append("embeddings")
    out = [
        CheckRecord(asset, c.name, c.passed, _jsonable({**c.details, "violations": c.violations}),
                    CHECK_SEVERITY.get(c.name, "ERROR"))
        for asset, c in zip(checks_for, checks, strict=True)
    ]
    out[0].metadata.pop("violations", None)  # the manifest check's details already count its mismatches
    gate = ctx.last_gate
    if gate is None:
        out.append(CheckRecord("embeddings", "quality_gate", True, {"note": "no generation switch judged in this run"}, "WARN"))
    else:
        meta = {k: v for k, v in gate.as_dict().items() if v is not None and k != "key"}
        out.append(CheckRecord("embeddings", "quality_gate", bool(gate.passed), _jsonable(meta), "WARN"))
    return RefreshRecord(idx.settings.index_name, ctx.run_id, shards, stages, out)


def _stage_metadata(report: dict, cls) -> dict:
    """The report's numeric figures under ``cls``'s field names (booleans as 0/1, floats rounded).

    Not ``seconds``: a run's step reports its own stage's time under it, the report only the whole
    refresh's; the stage's own timings (``seconds_manifest``, ``seconds_chunks``, ``seconds_embed``...)
    are there under their names."""
    out: dict = {}
    for f in fields(cls):
        if f.name == "seconds":
            continue
        v = metadata_number(report.get(f.name))
        if v is not None:
            out[f.name] = v
    return out


def _jsonable(d: dict) -> dict:
    """Check details as JSON scalars or lists/dicts of them (the outbox is JSON)."""
    import json

    return json.loads(json.dumps(d, default=str))


def write_outbox(conn: psycopg.Connection, rec: RefreshRecord) -> None:
    conn.execute(OUTBOX_DDL)
    conn.execute("INSERT INTO dagster_outbox (record) VALUES (%s)", (Jsonb(asdict(rec)),))
    if not conn.autocommit:
        conn.commit()


def waiting_records(settings: Settings) -> int:
    """How many refreshes wait in the index's outbox (no Dagster import)."""
    from rag_assets.store.db import connect_index

    conn = connect_index(settings)
    try:
        conn.execute(OUTBOX_DDL)
        return int(conn.execute("SELECT count(*) FROM dagster_outbox").fetchone()[0])
    finally:
        conn.close()


def spawn_reporter(settings: Settings) -> subprocess.Popen:
    """Start ``python -m rag_assets.defs.report`` detached; it drains the outbox and exits.

    The settings travel on its stdin (pickled, in memory: they may hold secrets), so it addresses
    the same index and instance however this process resolved them (``--index``, ``--location``).
    Its output goes to ``RAG_HOME/logs/dagster-record.log``; it outlives this process.
    """
    log_dir = Path(settings.home) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "dagster-record.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rag_assets.defs.report"],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not killed with the CLI's terminal or process group
            env=os.environ.copy(),
        )
    assert proc.stdin is not None
    proc.stdin.write(pickle.dumps(settings))
    proc.stdin.close()
    return proc
