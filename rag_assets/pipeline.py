"""The indexing pipeline: scan → manifest → chunks → embeddings, shard by shard.

Each stage is a function over a set of shards, transactional and level-triggered, so the same
functions serve the core CLI path (``Indexer.refresh`` runs them back to back), the Dagster assets
(one stage per asset, one range of shards per run) and crash recovery (a stage that did not finish
is simply behind and is caught up next time).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from rag_assets.chunking import Chunker, make_chunker
from rag_assets.embedders import Embedder, EmbedStats, make_embedder
from rag_assets.embedders.cache import ensure_embedder
from rag_assets.manifest import ManifestDiff, ManifestEntry, shard_of
from rag_assets.settings import Settings
from rag_assets.sources import BOUND_SOURCE_TAG, DocumentGone, FileStat, ScanResult, Source, open_source
from rag_assets.stage_results import ChunkResult, EmbedResult, ManifestResult, StageResult
from rag_assets.store.chunk_stage import lagging_chunk_shards, sync_chunks
from rag_assets.store.db import connect_index, lock_shards
from rag_assets.store.manifest_store import DocUpdate, apply_manifest, load_manifest, manifest_versions
from rag_assets.store.serving import (
    Generation,
    finalize_generation,
    generation_complete,
    get_generation,
    lagging_serving_shards,
    live_generation,
    sync_serving,
    target_generation,
)
from rag_assets.store.shard_count import require_shard_count
from rag_assets.store.source_binding import SourceSpec, bind_source, bound_folder
from rag_assets.store.webhook_docs import apply_inbox, pending_inbox_shards
from rag_assets.sync_cost import SyncCosts, SyncDecision, decide, no_choice
from rag_assets.tokens import preload as preload_tokenizer


@dataclass
class RefreshReport:
    """What a refresh did: the numbers ``index --json`` prints and Dagster records as metadata."""

    docs_total: int = 0
    docs_added: int = 0
    docs_modified: int = 0
    docs_metadata_only: int = 0
    docs_deleted: int = 0
    docs_unchanged: int = 0
    chunks_total: int = 0
    chunks_embedded: int = 0
    tokens_embedded: int = 0
    chunks_reused: int = 0
    tokens_reused: int = 0
    chunks_written: int = 0
    chunks_deleted: int = 0
    docs_rechunked: int = 0
    rows_written: int = 0
    rows_deleted: int = 0
    rows_moved: int = 0
    docs_meta_written: int = 0
    shards_refreshed: int = 0
    generation: int | None = None
    generation_switched: bool = False
    seconds: float = 0.0
    seconds_scan: float = 0.0
    seconds_manifest: float = 0.0
    seconds_chunks: float = 0.0
    seconds_embed: float = 0.0
    seconds_sync: float = 0.0
    seconds_copy: float = 0.0  # the rebuild path's copy of the live rows (0 on the live path)
    seconds_finish: float = 0.0  # HNSW build, verify and switch of a new generation (0 when none)
    sync_strategy: str = ""  # live | rebuild | new: how the serving rows were written (sync_cost.py)
    sync_decision: dict = field(default_factory=dict)  # SyncDecision.as_dict(): inputs and predictions
    price_per_mtok: float = 0.0
    cost_usd: float = 0.0
    cost_avoided_usd: float = 0.0
    full_reembed_tokens: int = 0
    embedder: str = ""
    embedding: dict = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)

    _SUMMED = [
        "docs_added",
        "docs_modified",
        "docs_metadata_only",
        "docs_deleted",
        "chunks_embedded",
        "tokens_embedded",
        "chunks_reused",
        "tokens_reused",
        "chunks_written",
        "chunks_deleted",
        "docs_rechunked",
        "rows_written",
        "rows_deleted",
        "rows_moved",
        "docs_meta_written",
        "seconds_scan",
        "seconds_manifest",
        "seconds_chunks",
        "seconds_embed",
        "seconds_sync",
        "seconds_copy",
        "cost_usd",
    ]

    def add_diff(self, d: ManifestDiff) -> None:
        self.docs_added += len(d.added)
        self.docs_modified += len(d.modified)
        self.docs_metadata_only += len(d.metadata_only)
        self.docs_deleted += len(d.deleted)

    def merge(self, other: dict | StageResult) -> None:
        """Add another (stage) report's counters into this one."""
        if isinstance(other, StageResult):
            other = other.stats()
        for k in self._SUMMED:
            if k in other and other[k] is not None:
                setattr(self, k, getattr(self, k) + other[k])
        self.errors.extend(other.get("errors") or [])
        if other.get("generation_switched"):
            self.generation_switched = True
        if other.get("sync_strategy") and self.sync_strategy != "rebuild":  # a rebuild anywhere shows
            self.sync_strategy, self.sync_decision = other["sync_strategy"], dict(other.get("sync_decision") or {})

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class IndexingError(RuntimeError):
    """A refresh failed; shards already synced keep their new state, the rest their old state."""


@dataclass
class ScanPlan:
    """The fast path's answer: which shards need work and which files must be re-read."""

    scan: ScanResult
    old: dict[str, ManifestEntry]
    shard_of_doc: dict[str, int]
    stale: set[int]
    reread: set[str]
    seconds: float = 0.0
    deleted: list[str] = field(default_factory=list)  # documents of the source absent from the scan

    @property
    def source_docs(self) -> int:
        """How many documents of the scanned source the manifest holds now."""
        return sum(1 for o in self.old.values() if o.source == BOUND_SOURCE_TAG)


def plan_scan(
    conn: psycopg.Connection, source: Source | None, n_shards: int, *, rehash: bool = False
) -> ScanPlan:
    """Scan the source (a folder's stats, a bucket's listing) and compare each document's change
    token with the manifest: only changed documents will be read.

    ``source=None`` (an index with no recorded source: webhook documents only) plans no source
    work at all, and in particular deletes no source document.
    """
    t0 = time.perf_counter()
    if source is None:
        return ScanPlan(ScanResult({}, []), load_manifest(conn), {}, set(), set(), time.perf_counter() - t0)
    scan = source.scan()
    old = load_manifest(conn)
    tokens = _stored_tokens(conn, source)
    failed = {
        d: (FileStat(size, mtime, token), err)
        for d, size, mtime, token, err in conn.execute(
            "SELECT doc_id, size, mtime_ns, token, error FROM source_errors WHERE source = %s", (source.name,)
        )
    }
    shard_of_doc = {}
    stale: set[int] = set()
    reread: set[str] = set()
    known_errors: list[tuple[str, str]] = []
    for doc_id, st in scan.stats.items():
        o = old.get(doc_id)
        shard = o.shard if o is not None else shard_of(doc_id, n_shards)
        shard_of_doc[doc_id] = shard
        if (
            rehash
            or o is None
            or o.source != source.name
            or o.size != st.size
            or o.mtime_ns != st.mtime_ns
            or tokens.get(doc_id) != st.token
        ):
            f = failed.get(doc_id)
            if not rehash and f is not None and f[0] == st:
                known_errors.append((doc_id, f[1]))  # still the same broken document: report, don't re-read
                continue
            reread.add(doc_id)
            stale.add(shard)
    deleted = []
    for doc_id, o in old.items():
        if o.source == source.name and doc_id not in scan.stats:
            stale.add(o.shard)
            deleted.append(doc_id)
    gone = [d for d in failed if d not in scan.stats]
    if gone:
        conn.execute("DELETE FROM source_errors WHERE doc_id = ANY(%s)", (gone,))
    scan.errors.extend(known_errors)
    return ScanPlan(scan, old, shard_of_doc, stale, reread, time.perf_counter() - t0, sorted(deleted))


def _stored_tokens(conn: psycopg.Connection, source: Source) -> dict[str, str | None]:
    """Each source document's stored change token beyond (size, mtime): for an object store, from
    the ETag and version id its metadata carries (written in the same transaction as the manifest
    row, and restored with it from snapshots). Empty for a folder, whose token is None."""
    keys = tuple(getattr(source, "token_metadata_keys", ()))
    if not keys:
        return {}
    cols = ", ".join("metadata->>%s" for _ in keys)
    rows = conn.execute(
        f"SELECT doc_id, {cols} FROM manifest WHERE source = %s", (*keys, source.name)
    ).fetchall()
    return {r[0]: source.token_of(*r[1:]) for r in rows}


# A refresh may delete at most this many documents without a check, whatever the share.
MASS_DELETE_FLOOR = 5


class MassDeleteRefused(IndexingError):
    """A refresh would delete most of the index; nothing was changed."""


def check_deletes(plan: ScanPlan, source: Source | None, max_fraction: float, *, allow: bool) -> None:
    """Refuse a refresh that would delete more than ``max_fraction`` of the source's documents.

    A mistyped path, an empty mount, ``RAG_INCLUDE=',,,'``: each looks like "every file was deleted",
    and an incremental run writes into the live generation, so rollback could not bring the
    documents back. ``allow`` (``--allow-deletes``) lets a real mass deletion through.
    """
    n, total = len(plan.deleted), plan.source_docs
    if allow or n <= MASS_DELETE_FLOOR or n <= max_fraction * total:
        return
    where = source.describe() if source is not None else "the source"
    sample = ", ".join(plan.deleted[:3])
    raise MassDeleteRefused(
        f"refusing to delete {n} of the {total} documents of this index ({n / total:.0%} > "
        f"RAG_MAX_DELETE_FRACTION={max_fraction:g}): they are missing from {where} (e.g. {sample}). "
        "If the folder, bucket, prefix or globs are wrong, fix them; if the documents really were deleted, run again "
        "with --allow-deletes"
    )


@dataclass
class StageContext:
    """Everything a stage needs; built once per process (CLI) or per step (Dagster)."""

    settings: Settings
    conn: psycopg.Connection
    embedder: Embedder
    chunker: Chunker
    embedder_id: int
    run_id: str
    kind: str = "cli"
    last_gate: object | None = None  # the quality gate's decision on the last switch attempt (quality_gate.py)
    converter: object | None = None  # sources.convert.DocumentConverter, made on first use of a source

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        conn: psycopg.Connection | None = None,
        embedder: Embedder | None = None,
        chunker: Chunker | None = None,
        run_id: str | None = None,
        kind: str = "cli",
    ) -> StageContext:
        conn = conn or connect_index(settings)
        embedder = embedder or make_embedder(settings)
        chunker = chunker or make_chunker(settings.chunker, settings.chunk_max_tokens)
        eid = ensure_embedder(conn, embedder)
        require_shard_count(conn, settings.shards)
        return cls(settings, conn, embedder, chunker, eid, run_id or uuid.uuid4().hex, kind)

    def source(self, path: Path | str | None = None, *, change_source: bool = False) -> Source | None:
        """The source this index reads (a folder or an ``s3://`` bucket prefix), from its recorded
        binding (``store/source_binding.py``).

        An explicit ``path`` (the CLI's ``index PATH``) is checked against the binding, recorded
        when none exists yet, and replaces it only with ``change_source``. Without one every path
        (sensors, service, assets, audit) uses the binding; an index with no binding and no folder
        documents binds ``RAG_SOURCE_PATH`` if it exists (the first build from ``dagster dev``);
        otherwise there is no folder (webhook documents only): None.
        """
        s = self.settings
        if path is not None:
            spec = SourceSpec.of(path, s.include, s.exclude)
            bind_source(self.conn, spec, change=change_source)
            return self._converting(open_source(spec.root, spec.include, spec.exclude, s))
        bound = bound_folder(self.conn, s)
        if bound is None:
            return None
        return self._converting(open_source(bound.root, bound.include, bound.exclude, s))

    def _converting(self, source: Source) -> Source:
        """The source, converting binary documents (PDF, Office, HTML) through this index's parse cache."""
        if self.converter is None:
            from rag_assets.formats import FormatLimits
            from rag_assets.sources.convert import DocumentConverter

            self.converter = DocumentConverter(self.conn, FormatLimits.from_settings(self.settings))
        source.converter = self.converter
        return source

    def target(self, fresh_token: str | None = None) -> Generation:
        return target_generation(
            self.conn,
            self.embedder_id,
            self.chunker.version,
            self.embedder.dims,
            fresh_token=fresh_token,
            text_search_config=self.settings.text_search_config,
        )

    def sync_costs(self) -> SyncCosts:
        s = self.settings
        return SyncCosts(
            s.sync_live_row_us, s.sync_copy_row_us, s.sync_build_row_us, s.sync_rebuild_fixed_s, s.sync_min_saving_s
        )

    def sync_target(self, shards: Iterable[int], gen: Generation) -> tuple[Generation, SyncDecision, float]:
        """Where the sync of ``shards`` writes: ``gen``, or, when ``gen`` is the live generation and
        the cost model (``RAG_SYNC_STRATEGY``) says a rebuild is cheaper, a new generation that
        starts as a copy of it. Call after the chunk stage of every shard of the refresh: the
        decision counts the rows the chunks need. Returns the generation, the decision and the
        seconds the copy took."""
        from rag_assets.store.rebuild import measure_sync_work, start_rebuild

        setting = self.settings.sync_strategy
        live = live_generation(self.conn)
        if live is None or gen.id != live.id:
            why = "first generation" if live is None else f"generation {gen.id} is being built"
            return gen, no_choice(setting, why), 0.0
        decision = decide(setting, measure_sync_work(self.conn, gen, shards), self.sync_costs())
        if decision.strategy != "rebuild":
            return gen, decision, 0.0
        t0 = time.perf_counter()
        new = start_rebuild(self.conn, live, self.run_id, self.settings.text_search_config)
        return new, decision, time.perf_counter() - t0

    def pending_shards(self, plan: ScanPlan, gen: Generation) -> set[int]:
        """Shards with source changes, plus any whose chunk or serving stage is behind."""
        return (
            set(plan.stale)
            | pending_inbox_shards(self.conn)
            | lagging_chunk_shards(self.conn, self.chunker.version)
            | lagging_serving_shards(self.conn, gen)
        )


def manifest_stage(
    ctx: StageContext, shards: Iterable[int], plan: ScanPlan, source: Source | None
) -> ManifestResult:
    """Read the changed files of ``shards`` and record their new manifest (one transaction).

    The plan was made without the shard lock; another writer may have changed these shards since.
    So the decisions are taken again under the lock, against the manifest as it is now: a document
    whose entry changed since the plan is re-read (never written back from the stale plan, which
    once produced ``metadata={}`` rows and "content changed but no body" failures), and a document
    another writer added after our scan is kept (our scan merely did not see it).
    """
    t0 = time.perf_counter()
    shards = set(shards)
    errors: list[dict] = []
    if source is None:  # no folder recorded for this index: only webhook documents change
        diff, versions = ManifestDiff(), {}
    else:
        with ctx.conn.transaction():
            lock_shards(ctx.conn, shards)
            current = load_manifest(ctx.conn, shards)
            updates = _folder_updates(plan, source, shards, current, errors)
            _record_source_errors(
                ctx.conn, source.name, plan, errors, [d for d, u in updates.items() if u.body is not None]
            )
            diff, versions = apply_manifest(ctx.conn, shards, updates, source=source.name)
    out = ManifestResult(**diff.counts(), changed=diff.changed)
    # documents pushed by webhooks into these shards
    hooks = apply_inbox(ctx.conn, shards, max_metadata_bytes=ctx.settings.max_metadata_bytes)
    for k in ("docs_added", "docs_modified", "docs_metadata_only", "docs_deleted"):
        setattr(out, k, getattr(out, k) + hooks.get(k, 0))
        out.changed = out.changed or bool(hooks.get(k))
    errors.extend(hooks["errors"])
    if not versions:
        versions = {s: v for s, v in manifest_versions(ctx.conn).items() if s in shards}
    out.errors = errors
    out.events_applied = hooks["events_applied"]
    out.events_stale = hooks["events_stale"]
    out.seconds_manifest = time.perf_counter() - t0
    out.versions = versions
    return out


def _folder_updates(
    plan: ScanPlan,
    source: Source,
    shards: set[int],
    current: dict[str, ManifestEntry],
    errors: list[dict],
) -> dict[str, DocUpdate]:
    """The new state of the source's documents in ``shards``, decided against ``current`` (locked).

    The documents to read are read through ``source.read_many`` (a bucket's GETs in parallel,
    bounded by ``RAG_S3_GET_CONCURRENCY``)."""
    updates: dict[str, DocUpdate] = {}
    to_read: list[str] = []
    for doc_id in sorted(plan.scan.stats):
        shard = plan.shard_of_doc[doc_id]
        if shard not in shards:
            continue
        o = current.get(doc_id)
        unchanged_since_plan = o is not None and o == plan.old.get(doc_id)
        if doc_id not in plan.reread and unchanged_since_plan:
            updates[doc_id] = DocUpdate(o, {}, None)
            continue
        to_read.append(doc_id)
    for doc_id, doc in source.read_many((d, plan.scan.stats[d]) for d in to_read):
        shard = plan.shard_of_doc[doc_id]
        o = current.get(doc_id)
        if isinstance(doc, DocumentGone):
            continue  # deleted while we ran: it is simply gone
        if isinstance(doc, Exception):  # a DocumentError naming the document
            errors.append({"doc_id": doc.doc_id, "error": doc.reason})
            if o is not None and o.source == source.name:
                updates[doc_id] = DocUpdate(o, {}, None)  # keep the last good version indexed
            continue
        entry = ManifestEntry(
            doc_id, shard, doc.content_hash, doc.meta_hash, doc.size, doc.mtime_ns, source.name
        )
        updates[doc_id] = DocUpdate(entry, doc.metadata, doc.text)
    for doc_id, o in current.items():
        if o.source == source.name and doc_id not in plan.scan.stats and doc_id not in plan.old:
            updates[doc_id] = DocUpdate(o, {}, None)  # added by another writer after our scan
    return updates


def _record_source_errors(
    conn: psycopg.Connection, source: str, plan: ScanPlan, errors: list[dict], read_ok: list[str]
) -> None:
    """Remember failing documents with their change token (not re-read until they change)."""
    with conn.transaction():
        if read_ok:
            conn.execute("DELETE FROM source_errors WHERE doc_id = ANY(%s)", (read_ok,))
        rows = [
            (
                e["doc_id"],
                source,
                plan.scan.stats[e["doc_id"]].size,
                plan.scan.stats[e["doc_id"]].mtime_ns,
                plan.scan.stats[e["doc_id"]].token,
                e["error"],
            )
            for e in errors
            if e["doc_id"] in plan.scan.stats
        ]
        if rows:
            with conn.cursor() as cur:
                cur.executemany(
                    """INSERT INTO source_errors (doc_id, source, size, mtime_ns, token, error)
                       VALUES (%s, %s, %s, %s, %s, %s)
                       ON CONFLICT (doc_id) DO UPDATE SET size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns,
                           token = EXCLUDED.token, error = EXCLUDED.error, seen_at = now()""",
                    rows,
                )


def chunk_stage(ctx: StageContext, shards: Iterable[int], *, force: bool = False) -> ChunkResult:
    t0 = time.perf_counter()
    st = sync_chunks(ctx.conn, shards, ctx.chunker, force=force)
    return ChunkResult(
        shards_rechunked=st.shards,
        docs_rechunked=st.docs_rechunked,
        chunks_written=st.chunks_written,
        chunks_deleted=st.chunks_deleted,
        seconds_chunks=time.perf_counter() - t0,
    )


def embed_stage(
    ctx: StageContext,
    shards: Iterable[int],
    *,
    gen: Generation | None = None,
    fresh_token: str | None = None,
    force: bool = False,
    finalize: bool = True,
    choose: bool = True,
) -> EmbedResult:
    """Embed cache misses and sync the serving rows of ``shards``; switch a completed new generation.

    When ``gen`` is the live generation (a plain incremental run: the Dagster embeddings asset),
    ``choose`` lets the cost model send the sync to a rebuilt generation instead
    (:meth:`StageContext.sync_target`); ``Indexer.refresh`` chooses once for all its batches and
    passes ``choose=False``. A forced sync (audit repair) never rebuilds.
    """
    gen = gen or ctx.target(fresh_token)
    decision, seconds_copy = None, 0.0
    if choose and not force and fresh_token is None:
        gen, decision, seconds_copy = ctx.sync_target(shards, gen)
    estats = EmbedStats()
    sst = sync_serving(ctx.conn, shards, gen, ctx.embedder, ctx.embedder_id, estats, force=force)
    counts = asdict(sst)
    counts.pop("shards")
    out = EmbedResult(
        **counts,
        shards_synced=sst.shards,
        seconds_embed=estats.seconds,
        embedding=estats.as_dict(),
        generation=gen.id,
        cost_usd=sst.tokens_embedded * ctx.embedder.price_per_mtok() / 1e6,
        seconds_copy=seconds_copy,
    )
    if decision is not None:
        out.sync_strategy, out.sync_decision = decision.strategy, decision.as_dict()
    if finalize:
        out.generation_switched = finish_generation(ctx, gen)
    return out


def finish_generation(ctx: StageContext, gen: Generation | None = None) -> bool:
    """Index, verify and switch to ``gen`` (default: this configuration's target) if it is a
    *building* generation whose every shard is synced. Returns True when it switched.

    Every path calls this at its end (core refresh, each Dagster embeddings run, the CLI's Dagster
    path even when no shard was stale, the ``finish_generation`` job the source sensor requests):
    a run killed between the last shard sync and the switch (during the HNSW build, say) leaves a
    complete building generation that no shard run would ever touch again.
    """
    gen = gen or ctx.target()
    current = get_generation(ctx.conn, gen.id) or gen
    if current.state != "building":
        return False
    s = ctx.settings
    decision = None
    from rag_assets.store.rebuild import is_rebuild_of_live

    gated = s.quality_questions and not is_rebuild_of_live(ctx.conn, current.id)
    if gated and generation_complete(ctx.conn, current):
        from rag_assets.quality_gate import judge, record_decision

        decision = ctx.last_gate = judge(s, ctx.conn, current)
        if not decision.passed:
            record_decision(ctx.conn, decision, s.quality_questions)
            logging.getLogger("rag_assets").warning(
                "switch to generation %s refused by the quality gate: %s", current.id, decision.reason
            )
            return False
    switched = finalize_generation(
        ctx.conn,
        current,
        s.keep_generations,
        hnsw_m=s.hnsw_m,
        hnsw_ef_construction=s.hnsw_ef_construction,
        hnsw_memory_cap_mb=s.hnsw_build_memory_mb,
        hnsw_workers=s.hnsw_build_workers,
    )
    if switched and decision is not None:
        record_decision(ctx.conn, decision, s.quality_questions)  # the new baseline
    return switched


def record_stage(
    ctx: StageContext,
    stage: str,
    shards: Iterable[int],
    started_at: datetime,
    stats: dict | StageResult,
    *,
    full_reembed_tokens: int = 0,
) -> None:
    """One row in ``runs`` per stage run: what ``status`` and ``cost`` read."""
    if isinstance(stats, StageResult):
        stats = stats.stats()
    price = ctx.embedder.price_per_mtok()
    tokens = int(stats.get("tokens_embedded") or 0)
    ctx.conn.execute(
        """INSERT INTO runs (run_id, kind, stage, shards, started_at, embedder, model, tokens_embedded,
               tokens_full_reembed, price_per_mtok, cost_usd, cost_avoided_usd, stats)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (
            ctx.run_id,
            ctx.kind,
            stage,
            sorted(set(shards)),
            started_at,
            ctx.embedder.fingerprint,
            ctx.embedder.model,
            tokens,
            full_reembed_tokens,
            price,
            tokens * price / 1e6,
            max(0, full_reembed_tokens - tokens) * price / 1e6,
            Jsonb(_jsonable(stats)),
        ),
    )
    if not ctx.conn.autocommit:
        ctx.conn.commit()


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "versions"}


def totals(conn: psycopg.Connection) -> tuple[int, int, int]:
    """(documents, chunks, tokens of all chunks): the corpus a full re-embed would pay for."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM manifest), (SELECT count(*) FROM chunks),"
        " (SELECT coalesce(sum(n_tokens), 0) FROM chunks)"
    ).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def finish_report(ctx: StageContext, rep: RefreshReport) -> RefreshReport:
    """Fill the totals, cost and live generation of a report."""
    rep.docs_total, rep.chunks_total, rep.full_reembed_tokens = totals(ctx.conn)
    rep.docs_unchanged = max(0, rep.docs_total - rep.docs_added - rep.docs_modified - rep.docs_metadata_only)
    rep.price_per_mtok = ctx.embedder.price_per_mtok()
    rep.cost_usd = rep.tokens_embedded * rep.price_per_mtok / 1e6
    rep.cost_avoided_usd = max(0, rep.full_reembed_tokens - rep.tokens_embedded) * rep.price_per_mtok / 1e6
    live = live_generation(ctx.conn)
    rep.generation = live.id if live else None
    rep.embedder = ctx.embedder.fingerprint
    return rep


def shard_batches(shards: list[int], plan: ScanPlan, max_docs: int) -> list[list[int]]:
    """Group shards so one batch reads at most ~``max_docs`` documents (bounded memory)."""
    per_shard: dict[int, int] = {}
    for d in plan.reread:
        s = plan.shard_of_doc[d]
        per_shard[s] = per_shard.get(s, 0) + 1
    out: list[list[int]] = []
    cur: list[int] = []
    load = 0
    for s in shards:
        cur.append(s)
        load += per_shard.get(s, 0)
        if load >= max_docs:
            out.append(cur)
            cur, load = [], 0
    if cur:
        out.append(cur)
    return out


class Indexer:
    """The core, outside Dagster: refresh a folder into the index, incrementally or in full."""

    def __init__(
        self,
        settings: Settings,
        *,
        conn: psycopg.Connection | None = None,
        embedder: Embedder | None = None,
        chunker: Chunker | None = None,
    ):
        self.ctx = StageContext.create(settings, conn=conn, embedder=embedder, chunker=chunker)
        self.settings = settings

    @property
    def conn(self) -> psycopg.Connection:
        return self.ctx.conn

    @property
    def embedder(self) -> Embedder:
        return self.ctx.embedder

    def source(self, path=None, *, change_source: bool = False) -> Source | None:
        return self.ctx.source(path, change_source=change_source)

    def refresh(
        self,
        path=None,
        *,
        full: bool = False,
        rehash: bool = False,
        progress: bool | None = None,
        shard_batch_docs: int = 8000,
        allow_deletes: bool = False,
        change_source: bool = False,
    ) -> RefreshReport:
        """Incremental refresh (or ``full`` rebuild into a new generation) of the source at ``path``
        (a folder or ``s3://bucket/prefix``; default: the source the index is bound to; see
        :meth:`StageContext.source`)."""
        t_start = time.perf_counter()
        started_at = datetime.now(UTC)
        ctx = self.ctx
        ctx.run_id = uuid.uuid4().hex
        rep = RefreshReport()
        source = self.source(path, change_source=change_source)
        plan = plan_scan(ctx.conn, source, self.settings.shards, rehash=rehash or full)
        check_deletes(plan, source, self.settings.max_delete_fraction, allow=allow_deletes)
        rep.seconds_scan = plan.seconds
        rep.errors.extend({"doc_id": p, "error": r} for p, r in plan.scan.errors)
        gen = ctx.target(fresh_token=ctx.run_id if full else None)
        pending = set(range(self.settings.shards)) if full else ctx.pending_shards(plan, gen)
        if pending:  # chunking counts tokens: load the tokenizer while the changed files are read
            preload_tokenizer()
        if progress is None:
            progress = sys.stderr.isatty()
        bar = None
        if progress and pending:
            from tqdm import tqdm

            bar = tqdm(total=len(pending), unit="shard", desc="indexing", file=sys.stderr, leave=False)
        try:
            # Manifest and chunks of every batch first: the choice between writing into the live
            # generation and rebuilding one needs the number of rows the new chunks need.
            batches = shard_batches(sorted(pending), plan, shard_batch_docs)
            touched = []
            for batch in batches:
                m = manifest_stage(ctx, batch, plan, source)
                c = chunk_stage(ctx, batch, force=full)
                for part in (m, c):
                    rep.merge(part)
                touched.append(m.changed or bool(c.shards_rechunked))
            if pending:
                gen, decision, rep.seconds_copy = ctx.sync_target(pending, gen)
                rep.sync_strategy, rep.sync_decision = decision.strategy, decision.as_dict()
            for batch, changed in zip(batches, touched, strict=True):
                e = embed_stage(ctx, batch, gen=gen, finalize=False, choose=False)
                rep.merge(e)
                rep.embedding = _merge_embedding(rep.embedding, e.embedding)
                if changed or e.shards_synced:
                    rep.shards_refreshed += len(batch)
                if bar is not None:
                    bar.update(len(batch))
            t_finish = time.perf_counter()
            rep.generation_switched = finish_generation(ctx, gen)
            if rep.generation_switched:
                rep.seconds_finish = time.perf_counter() - t_finish
        except Exception as e:
            if ctx.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                ctx.conn.rollback()
            raise IndexingError(f"refresh failed: {e}") from e
        finally:
            if bar is not None:
                bar.close()
        finish_report(ctx, rep)
        rep.seconds = time.perf_counter() - t_start
        if pending:  # a refresh with nothing to do is not a run (as on the Dagster path)
            record_stage(
                ctx,
                "refresh",
                pending,
                started_at,
                rep.as_dict(),
                full_reembed_tokens=rep.full_reembed_tokens,
            )
        return rep

    def close(self) -> None:
        self.ctx.embedder.close()
        self.ctx.conn.close()


def _merge_embedding(a: dict, b: dict) -> dict:
    """Combine two ``EmbedStats.as_dict()`` (sums; latency percentiles keep the larger)."""
    if not a:
        return dict(b)
    out = dict(a)
    for k, v in b.items():
        if v is None:
            continue
        if k.startswith("latency_"):
            out[k] = max(out.get(k) or 0, v)
        elif k == "batch_size_limit":  # the learned limit only goes down: the smallest is the latest
            out[k] = v if out.get(k) is None else min(out[k], v)
        else:
            out[k] = (out.get(k) or 0) + v
    return out
