"""The asset graph: raw_documents → document_manifest → chunks → embeddings, per shard.

All four share one static shard partitioning (``RAG_SHARDS``, 64 by default). Each asset is a thin
call into one core stage over ``context.partition_keys`` (a range run covers many shards in one
process), returns ``MaterializeResult`` with numeric metadata under stable keys, and writes its
data to Postgres itself (file IO managers cannot store range runs).

No ``from __future__ import annotations`` in this package: Dagster resolves the Config and
resource annotations at definition time and cannot resolve string annotations.
"""

import time
from datetime import UTC, datetime

import dagster as dg

from rag_assets.checks import manifest_matches_source, serving_checks
from rag_assets.chunking import make_chunker
from rag_assets.embedders import embedder_fingerprint
from rag_assets.formats.registry import formats_code_version
from rag_assets.manifest import shard_key
from rag_assets.pipeline import (
    StageContext,
    check_deletes,
    chunk_stage,
    embed_stage,
    manifest_stage,
    plan_scan,
    record_stage,
    totals,
)
from rag_assets.settings import Settings
from rag_assets.store.generations import get_generation

from .names import IndexNames
from .resources import stage_context_from

MANIFEST_CODE_VERSION = "manifest-v1"
SERVING_CHECKS = ("rows_match_chunks", "no_orphan_rows", "vectors_valid")
QUALITY_CHECK = "quality_gate"  # recall@k of a new generation against the live one, at each switch attempt
# React to new upstream data, and re-run every materialized shard when our own code version
# (chunker or embedder fingerprint) changes — but never shards whose parents are missing.
refresh_condition = dg.AutomationCondition.eager() | (
    dg.AutomationCondition.code_version_changed() & ~dg.AutomationCondition.any_deps_missing()
)


class RefreshConfig(dg.Config):
    """Run options. ``rebuild``: a full reindex of the run's shards (re-read every file, re-chunk
    every document, re-sync every row); when a run covers all shards it builds a new generation
    and switches to it when complete, so readers keep the old index meanwhile."""

    rehash: bool = False
    rebuild: bool = False
    # Let through a refresh that deletes more than RAG_MAX_DELETE_FRACTION of the documents.
    allow_deletes: bool = False


def _shards(context: dg.AssetExecutionContext) -> list[int]:
    return sorted(int(k) for k in context.partition_keys)


def _rebuild(context: dg.AssetExecutionContext, config: RefreshConfig) -> bool:
    """A rebuild is asked by run config or by the ``rag/mode=rebuild`` tag of the full_reindex job."""
    return config.rebuild or context.run.tags.get("rag/mode") == "rebuild"


def _fresh_token(
    context: dg.AssetExecutionContext, config: RefreshConfig, shards: list[int], n_shards: int
) -> str | None:
    """A rebuild of every shard goes to a new generation, shared by all runs of one backfill."""
    if not _rebuild(context, config) or len(shards) < n_shards:
        return None
    return (
        context.run.tags.get("dagster/backfill") or context.run.tags.get("rag/rebuild") or context.run.run_id
    )


def _switch_plan(conn, settings: Settings) -> dict:
    """``rag-assets plan``'s figures, as the materialization metadata of a run that builds a new
    generation, computed before it embeds: the texts and tokens missing from the embedding cache
    under the configured embedder, and their price."""
    from rag_assets.plan import plan_switch

    p = plan_switch(conn, settings)
    return {
        "plan_texts_to_embed": p.texts_to_embed,
        "plan_tokens_to_embed": p.tokens_to_embed,
        "plan_texts_cached": p.texts_cached,
        "plan_cost_usd": dg.MetadataValue.float(p.cost_usd),
        "plan_price_known": p.price_known,
    }


def build_assets(settings: Settings) -> tuple[dg.AssetSpec, list[dg.AssetsDefinition]]:
    """The four assets of one index (partitions, code versions and names come from ``settings``)."""
    names = IndexNames.of(settings)
    resource_keys = {names.rag_resource, names.embedder_resource}
    chunker_version = make_chunker(settings.chunker, settings.chunk_max_tokens).version
    # Computed offline: loading the definitions needs no API key, opens no socket, loads no model.
    fingerprint = embedder_fingerprint(settings)
    shards_def = dg.StaticPartitionsDefinition([shard_key(i) for i in range(settings.shards)])
    range_runs = dg.BackfillPolicy.single_run()

    raw_documents = dg.AssetSpec(
        names.key("raw_documents"),
        partitions_def=shards_def,
        group_name=names.group,
        kinds={"folder"},
        tags={"rag/index": settings.index_name},
        description=(
            "The source documents of each shard (folder files and webhook pushes). Reported, not run: the "
            "source sensor records a materialization whose data version is the hash of the shard's file "
            "stats whenever a shard's files change."
        ),
    )

    @dg.asset(
        key=names.key("document_manifest"),
        required_resource_keys=resource_keys,
        partitions_def=shards_def,
        deps=[raw_documents],
        group_name=names.group,
        kinds={"postgres"},
        # a converter upgrade (formats_code_version) makes every shard stale: documents are converted again
        code_version=f"{MANIFEST_CODE_VERSION}+{formats_code_version()}",
        backfill_policy=range_runs,
        automation_condition=dg.AutomationCondition.eager(),
        check_specs=[dg.AssetCheckSpec("manifest_matches_source", asset=names.key("document_manifest"))],
        description=(
            "Per shard: doc_id, content hash, metadata hash, size, mtime and source of every document, plus the "
            "normalised bodies. Only files whose (size, mtime) changed are re-read; webhook events for the shard are "
            "applied here (newest source time wins)."
        ),
    )
    def document_manifest(
        context: dg.AssetExecutionContext, config: RefreshConfig
    ) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        started = datetime.now(UTC)
        shards = _shards(context)
        ctx = stage_context_from(context, names)
        try:
            source = ctx.source()
            plan = plan_scan(
                ctx.conn, source, ctx.settings.shards, rehash=config.rehash or _rebuild(context, config)
            )
            check_deletes(plan, source, ctx.settings.max_delete_fraction, allow=config.allow_deletes)
            out = manifest_stage(ctx, shards, plan, source)
            out.seconds_scan = plan.seconds
            out.seconds = time.perf_counter() - t0
            record_stage(ctx, "manifest", shards, started, out)
            check = manifest_matches_source(ctx.conn, source, shards, sample=100)
            docs = dict(
                ctx.conn.execute(
                    "SELECT shard, count(*) FROM manifest WHERE shard = ANY(%s) GROUP BY shard", (shards,)
                ).fetchall()
            )
        finally:
            ctx.conn.close()
        for s in shards:
            context.add_asset_metadata(
                {"shard_documents": docs.get(s, 0), "manifest_version": out.versions.get(s, "")},
                partition_key=shard_key(s),
            )
        for e in out.errors[:20]:
            context.log.warning(f"skipped {e['doc_id']}: {e['error']}")
        meta: dict = out.metadata()
        meta["shards_in_run"] = len(shards)
        if out.errors:
            meta["error_list"] = dg.MetadataValue.json(out.errors[:50])
        version = dg.DataVersion(out.versions[shards[0]]) if len(shards) == 1 else None
        return dg.MaterializeResult(
            metadata=meta,
            data_version=version,
            check_results=[
                dg.AssetCheckResult(
                    check_name="manifest_matches_source",
                    passed=check.passed,
                    metadata=check.details,
                    severity=dg.AssetCheckSeverity.WARN,
                )
            ],
        )

    @dg.asset(
        key=names.key("chunks"),
        required_resource_keys=resource_keys,
        partitions_def=shards_def,
        deps=[document_manifest],
        group_name=names.group,
        kinds={"postgres"},
        code_version=chunker_version,
        backfill_policy=range_runs,
        automation_condition=refresh_condition,
        description=(
            "Per shard: doc_id, seq, text, char span, chunk hash and token count of every chunk. Structure-aware "
            "chunking with content-defined boundaries keeps an edit local to the chunks it touches; only documents "
            "whose body or the chunker changed are re-chunked. code_version = chunker version."
        ),
    )
    def chunks(
        context: dg.AssetExecutionContext, config: RefreshConfig
    ) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        started = datetime.now(UTC)
        shards = _shards(context)
        ctx = stage_context_from(context, names)
        try:
            out = chunk_stage(ctx, shards, force=_rebuild(context, config))
            out.seconds = time.perf_counter() - t0
            record_stage(ctx, "chunks", shards, started, out)
            per_shard = dict(
                ctx.conn.execute(
                    "SELECT shard, count(*) FROM chunks WHERE shard = ANY(%s) GROUP BY shard", (shards,)
                ).fetchall()
            )
            versions = dict(
                ctx.conn.execute(
                    "SELECT shard, chunks_version FROM shard_state WHERE shard = ANY(%s)", (shards,)
                ).fetchall()
            )
        finally:
            ctx.conn.close()
        for s in shards:
            context.add_asset_metadata({"shard_chunks": per_shard.get(s, 0)}, partition_key=shard_key(s))
        meta: dict = out.metadata()
        meta["chunks_total"] = sum(per_shard.values())
        meta["shards_in_run"] = len(shards)
        version = (
            dg.DataVersion(versions.get(shards[0], "")[:64])
            if len(shards) == 1 and versions.get(shards[0])
            else None
        )
        return dg.MaterializeResult(metadata=meta, data_version=version)

    @dg.asset(
        key=names.key("embeddings"),
        required_resource_keys=resource_keys,
        partitions_def=shards_def,
        deps=[chunks],
        group_name=names.group,
        kinds={"pgvector", "postgres"},
        code_version=fingerprint,
        backfill_policy=range_runs,
        automation_condition=refresh_condition,
        pool="embedder",
        check_specs=[
            *(
                dg.AssetCheckSpec(name, asset=names.key("embeddings"), blocking=(name == "rows_match_chunks"))
                for name in SERVING_CHECKS
            ),
            dg.AssetCheckSpec(
                QUALITY_CHECK,
                asset=names.key("embeddings"),
                description="recall@k of a new generation vs the live one (RAG_QUALITY_QUESTIONS); a drop "
                "beyond RAG_QUALITY_TOLERANCE refuses the switch and the old generation keeps serving",
            ),
        ],
        description=(
            "The serving rows: one per chunk with its vector (HNSW, cosine) and its document's metadata, in the live "
            "generation. Vectors come from the embedding cache keyed by (chunk hash, embedder fingerprint); only "
            "misses reach the embedder. code_version = embedder fingerprint: a model change re-embeds every shard "
            "into a new generation while the old one serves, then switches."
        ),
    )
    def embeddings(
        context: dg.AssetExecutionContext, config: RefreshConfig
    ) -> dg.MaterializeResult:
        t0 = time.perf_counter()
        started = datetime.now(UTC)
        shards = _shards(context)
        ctx = stage_context_from(context, names)
        try:
            token = _fresh_token(context, config, shards, settings.shards)
            # a run that builds a new generation shows first what the switch embeds and costs
            switch_plan = _switch_plan(ctx.conn, ctx.settings) if token is not None else {}
            gen = ctx.target(token)
            out = embed_stage(ctx, shards, gen=gen, force=_rebuild(context, config) and token is None)
            if out.generation != gen.id:  # the cost model chose to rebuild (sync_cost.py): check that one
                gen = get_generation(ctx.conn, out.generation) or gen
            results = serving_checks(ctx.conn, gen, shards)
            _, chunks_total, full_tokens = totals(ctx.conn)
            out.seconds = time.perf_counter() - t0
            record_stage(ctx, "embeddings", shards, started, out, full_reembed_tokens=full_tokens)
            docs_counts = _docs_counts(ctx, context.run.run_id)  # for the plots only; recorded by the manifest step
            emb = out.embedding
        finally:
            ctx.conn.close()
        if out.generation_switched:
            context.log.info(f"generation {gen.id} complete and verified: now live")
        needed = out.chunks_embedded + out.chunks_reused
        meta: dict = {**out.metadata(), **docs_counts, **switch_plan}
        meta.update(
            chunks_total=chunks_total,
            cache_hit_rate=round(out.chunks_reused / needed, 4) if needed else 1.0,
            embed_seconds=round(out.seconds_embed, 4),
            embed_requests=emb.get("requests") or 0,
            embed_retries=emb.get("retries") or 0,
            throttled_429=emb.get("throttled_429") or 0,
            rate_limit_wait_s=emb.get("rate_limit_wait_s") or 0.0,
            embed_batch_splits=emb.get("batch_splits") or 0,
            cost_avoided_usd=round(
                max(0, full_tokens - out.tokens_embedded) * ctx.embedder.price_per_mtok() / 1e6, 6
            ),
            shards_in_run=len(shards),
        )
        if emb.get("batch_size_limit") is not None:  # the batch size the endpoint was found to take
            meta["embed_batch_size_limit"] = int(emb["batch_size_limit"])
        if emb.get("latency_p50_ms") is not None:
            meta["latency_p50_ms"] = round(emb["latency_p50_ms"], 2)
            meta["latency_p95_ms"] = round(emb["latency_p95_ms"], 2)
        return dg.MaterializeResult(
            metadata=meta,
            check_results=[
                dg.AssetCheckResult(
                    check_name=r.name, passed=r.passed, metadata={**r.details, "violations": r.violations}
                )
                for r in results
            ]
            + [_quality_check(ctx.last_gate)],
        )

    return raw_documents, [document_manifest, chunks, embeddings]


def _quality_check(decision) -> dg.AssetCheckResult:
    """The quality gate's figures when this run attempted a switch; else a pass saying none was judged."""
    if decision is None:
        return dg.AssetCheckResult(
            check_name=QUALITY_CHECK, passed=True, metadata={"note": "no generation switch judged in this run"}
        )
    meta = {k: v for k, v in decision.as_dict().items() if v is not None and k != "key"}
    return dg.AssetCheckResult(
        check_name=QUALITY_CHECK, passed=decision.passed, metadata=meta, severity=dg.AssetCheckSeverity.WARN
    )


def _docs_counts(ctx: StageContext, run_id: str) -> dict:
    """The document counts of this run's manifest step (same run id), for the embeddings plots."""
    row = ctx.conn.execute(
        "SELECT stats FROM runs WHERE run_id = %s AND stage = 'manifest' ORDER BY id DESC LIMIT 1",
        (run_id,),
    ).fetchone()
    if not row:
        return {}
    return {
        k: row[0].get(k, 0) for k in ("docs_added", "docs_modified", "docs_metadata_only", "docs_deleted")
    }
