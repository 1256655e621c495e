"""The Dagster layer: definitions, automation, sensors, range runs, checks, full reindex, audit.

Everything runs against a real Postgres (a fresh database per test) and real Dagster instances
(``instance_for_test``); only the clock of the automation evaluation is Dagster's own.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace

import dagster as dg
import pytest

from rag_assets.definitions import build_defs
from rag_assets.defs.assets import build_assets
from rag_assets.defs.resources import resources_for
from rag_assets.defs.runner import contiguous_ranges, index_via_dagster
from rag_assets.defs.sensors import build_sensors
from rag_assets.manifest import shard_key, shard_of
from rag_assets.pipeline import Indexer
from rag_assets.settings import Settings
from rag_assets.store.db import connect_index
from rag_assets.store.serving import index_digest, live_generation
from tests.helpers import markdown_doc, write

N = 8
RANGE = {"dagster/asset_partition_range_start": "00", "dagster/asset_partition_range_end": f"{N - 1:02d}"}


@pytest.fixture
def dset(db_url, tmp_path) -> Settings:
    docs = tmp_path / "docs"
    rng = random.Random(11)
    for i in range(24):
        write(docs / f"d{i:02d}.md", markdown_doc(rng), mtime_ns=10**18 + i)
    return Settings.from_env(
        {}, home=tmp_path / "home", database_url=db_url, shards=N, source_path=docs, embedding_dimensions=32
    )


@pytest.fixture
def defs(dset):
    return build_defs(dset, resources=resources_for(dset))


def _assets(defs):
    g = defs.resolve_asset_graph()
    return [
        defs.resolve_assets_def(k)
        for k in (dg.AssetKey("document_manifest"), dg.AssetKey("chunks"), dg.AssetKey("embeddings"))
    ], g


def _materialize_all(dset, instance, **kw):
    _, assets = build_assets(dset)
    return dg.materialize(assets, instance=instance, resources=resources_for(dset), tags=RANGE, **kw)


def _tick(sensor, instance, dset, cursor):
    """One sensor evaluation; its runless events are stored in the instance like the daemon does."""
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources_for(dset))
    res = sensor(ctx)
    if isinstance(res, dg.SkipReason):
        return [], cursor
    for ev in res.asset_events:
        instance.report_runless_asset_event(ev)
    return [ev.partition for ev in res.asset_events], res.cursor


def _requested(result, key: str) -> set[str]:
    return set(result.get_requested_partitions(dg.AssetKey(key)))


def test_definitions_load_with_metadata(defs, dset):
    dg.Definitions.validate_loadable(defs)
    g = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in g.get_all_asset_keys()}
    assert keys == {"raw_documents", "document_manifest", "chunks", "embeddings", "index_snapshot"}
    keys.discard("index_snapshot")  # unpartitioned: one snapshot of every shard
    from rag_assets.chunking import make_chunker
    from rag_assets.embedders import make_embedder

    for k in keys:
        node = g.get(dg.AssetKey(k))
        assert node.partitions_def.get_partition_keys() == [shard_key(i) for i in range(N)]
        assert node.group_name == "rag" and node.description and node.kinds
    assert g.get(dg.AssetKey("chunks")).code_version == make_chunker(dset.chunker).version
    assert g.get(dg.AssetKey("embeddings")).code_version == make_embedder(dset).fingerprint
    assert {s.name for s in defs.sensors} == {"source_sensor", "inbox_sensor", "generation_sensor", "rag_automation"}
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING for s in defs.sensors)
    assert defs.resolve_job_def("full_reindex") and defs.resolve_job_def("consistency_audit")


def test_module_level_defs_load_from_environment():
    from rag_assets.definitions import defs as module_defs

    dg.Definitions.validate_loadable(module_defs)


def test_range_run_builds_the_index_with_checks_and_metadata(dset, make_db):
    with dg.instance_for_test() as instance:
        res = _materialize_all(dset, instance)
        assert res.success
        evals = res.get_asset_check_evaluations()
        assert {e.check_name for e in evals} == {
            "manifest_matches_source",
            "rows_match_chunks",
            "no_orphan_rows",
            "vectors_valid",
            "quality_gate",
        }
        assert all(e.passed for e in evals)
        mats = [e for e in res.get_asset_materialization_events() if e.asset_key == dg.AssetKey("embeddings")]
        assert len(mats) == N  # one materialization per shard, all in one run
        meta = mats[0].materialization.metadata
        for key in (
            "docs_added",
            "chunks_embedded",
            "chunks_reused",
            "tokens_embedded",
            "cache_hit_rate",
            "embed_seconds",
            "rows_written",
            "rows_deleted",
            "seconds",
            "chunks_total",
        ):
            assert key in meta, key
        assert meta["docs_added"].value == 24
    conn = connect_index(dset)
    ref = Indexer(replace(dset, database_url=make_db()))
    ref.refresh(dset.source_path, full=True)
    assert index_digest(conn) == index_digest(ref.conn)


def test_automation_requests_only_stale_shards(dset, defs):
    source_sensor = next(s for s in build_sensors(dset) if s.name == "source_sensor")
    with dg.instance_for_test() as instance:
        boot = dg.evaluate_automation_conditions(defs=defs, instance=instance)  # the daemon's first tick
        assert boot.total_requested == 0
        reported, cursor = _tick(source_sensor, instance, dset, None)
        assert sorted(reported) == [shard_key(i) for i in range(N)]  # every shard, empty ones too
        r0 = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=boot.cursor)
        assert _requested(r0, "document_manifest") == {shard_key(i) for i in range(N)}
        assert _materialize_all(dset, instance).success
        r1 = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=r0.cursor)
        assert r1.total_requested == 0  # nothing changed: nothing requested
        assert _tick(source_sensor, instance, dset, cursor)[0] == []

        target = dset.source_path / "d05.md"
        write(target, markdown_doc(random.Random(99)), mtime_ns=2 * 10**18)
        reported, cursor = _tick(source_sensor, instance, dset, cursor)
        shard = shard_key(shard_of("d05.md", N))
        assert reported == [shard]
        r2 = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=r1.cursor)
        for key in ("document_manifest", "chunks", "embeddings"):
            assert _requested(r2, key) == {shard}, key

        # a new embedder fingerprint (code version) requests every materialized shard
        changed = replace(dset, embedding_dimensions=48)
        defs2 = build_defs(changed, resources=resources_for(changed))
        r3 = dg.evaluate_automation_conditions(defs=defs2, instance=instance, cursor=r2.cursor)
        assert _requested(r3, "embeddings") == {shard_key(i) for i in range(N)}
        assert _requested(r3, "document_manifest") == set()


def test_source_sensor_reports_a_b_a_and_deletes(dset):
    source_sensor = next(s for s in build_sensors(dset) if s.name == "source_sensor")
    f = dset.source_path / "d03.md"
    shard = shard_key(shard_of("d03.md", N))
    a, b = "# A\n\nversion a", "# B\n\nversion b"
    with dg.instance_for_test() as instance:
        write(f, a, mtime_ns=3 * 10**18)
        _, cursor = _tick(source_sensor, instance, dset, None)
        write(f, b, mtime_ns=3 * 10**18 + 1)
        rep, cursor = _tick(source_sensor, instance, dset, cursor)
        assert rep == [shard]
        write(f, a, mtime_ns=3 * 10**18 + 2)  # back to A: must be reported again (no run keys)
        rep, cursor = _tick(source_sensor, instance, dset, cursor)
        assert rep == [shard]
        f.unlink()
        rep, cursor = _tick(source_sensor, instance, dset, cursor)
        assert rep == [shard]
        assert len(json.loads(cursor)) == N  # cursor bounded by the shard count


def test_a_b_a_edits_are_indexed_each_time(dset):
    f = dset.source_path / "d03.md"
    with dg.instance_for_test() as instance:
        assert _materialize_all(dset, instance).success
        conn = connect_index(dset)
        texts = []
        for i, body in enumerate(["# A\n\nalpha text", "# B\n\nbeta text", "# A\n\nalpha text"]):
            write(f, body, mtime_ns=4 * 10**18 + i)
            assert _materialize_all(dset, instance).success
            texts.append(
                [
                    t
                    for (t,) in conn.execute(
                        "SELECT text FROM items WHERE doc_id = 'd03.md' ORDER BY seq"
                    )
                ]
            )
        assert texts[0] == texts[2] != texts[1]


def test_inbox_sensor_reports_shards_with_new_events(dset):
    inbox_sensor = next(s for s in build_sensors(dset) if s.name == "inbox_sensor")
    conn = connect_index(dset)
    with dg.instance_for_test() as instance:
        assert _tick(inbox_sensor, instance, dset, None)[0] == []
        for i, doc in enumerate(["hook/a", "hook/b"]):
            conn.execute(
                "INSERT INTO inbox (event_id, event_type, doc_id, shard, source_time, content) "
                "VALUES (%s, 'document.created', %s, %s, now(), 'hello')",
                (f"ev{i}", doc, shard_of(doc, N)),
            )
        rep, cursor = _tick(inbox_sensor, instance, dset, None)
        assert sorted(rep) == sorted({shard_key(shard_of(d, N)) for d in ("hook/a", "hook/b")})
        assert _tick(inbox_sensor, instance, dset, cursor)[0] == []  # nothing new
        assert json.loads(cursor)["hw"] >= 2


def test_full_reindex_job_builds_and_switches_a_new_generation(dset, defs):
    with dg.instance_for_test() as instance:
        assert _materialize_all(dset, instance).success
        conn = connect_index(dset)
        before = live_generation(conn).id
        digest = index_digest(conn)
        job = defs.resolve_job_def("full_reindex")
        res = job.execute_in_process(instance=instance, tags=RANGE, resources=resources_for(dset))
        assert res.success
        assert live_generation(conn).id > before
        assert index_digest(conn) == digest
        # the run building the new generation shows what the switch embeds (rag-assets plan's figures),
        # worked out before it embedded: the same embedder, so every text is already in the cache
        mats = [e for e in res.get_asset_materialization_events() if e.asset_key == dg.AssetKey("embeddings")]
        distinct = conn.execute("SELECT count(DISTINCT chunk_hash) FROM chunks").fetchone()[0]
        assert len(mats) == dset.shards  # one per shard of the range run, each with the run's plan
        for mat in mats:
            meta = mat.materialization.metadata
            assert meta["plan_texts_to_embed"].value == 0 and meta["plan_tokens_to_embed"].value == 0
            assert meta["plan_texts_cached"].value == distinct > 0 and meta["plan_cost_usd"].value == 0.0


def test_audit_finds_and_repairs_drift(dset, defs, make_db):
    with dg.instance_for_test() as instance:
        assert _materialize_all(dset, instance).success
        conn = connect_index(dset)
        gen = live_generation(conn).id
        conn.execute(f"DELETE FROM g{gen}_items WHERE doc_id = 'd01.md'")  # missing rows
        conn.execute(  # stale text
            f"UPDATE g{gen}_items SET text = 'tampered' WHERE chunk_id = "
            f"(SELECT chunk_id FROM g{gen}_pos WHERE doc_id = 'd02.md' AND seq = 0)"
        )
        conn.execute(
            f"UPDATE g{gen}_pos SET seq = seq + 100 WHERE doc_id = 'd03.md' AND seq = 0"
        )  # moved
        conn.execute(  # orphan
            f"INSERT INTO g{gen}_items SELECT 'x', 'ghost.md', shard, chunk_hash, text, embedding "
            f"FROM g{gen}_items LIMIT 1"
        )
        conn.execute(f"UPDATE g{gen}_docs SET metadata = '{{}}' WHERE doc_id = 'd04.md'")
        res = defs.resolve_job_def("consistency_audit").execute_in_process(
            instance=instance, resources=resources_for(dset)
        )
        assert res.success
        report = res.output_for_node("audit_and_repair")
        assert report["found"]["rows_missing"] > 0 and report["found"]["rows_orphaned"] == 1
        assert report["found"]["rows_stale"] == 2 and report["found"]["docs_drift"] == 1
        assert report["repaired"]
    ref = Indexer(replace(dset, database_url=make_db()))
    ref.refresh(dset.source_path, full=True)
    assert index_digest(conn) == index_digest(ref.conn)


def test_cli_path_materializes_through_dagster_and_skips_when_nothing_changed(dset, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(dset.home / "dh"))
    (dset.home / "dh").mkdir(parents=True)
    (dset.home / "dh" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)
    rep = index_via_dagster(dset, dset.source_path)
    assert rep.docs_added == 24 and rep.chunks_embedded > 0 and rep.generation is not None
    assert "DAGSTER_EVENT_BATCH_SIZE" not in os.environ  # batched event writes only around our runs
    instance = dg.DagsterInstance.from_config(str(dset.home / "dh"))
    runs = instance.get_runs()
    assert len(runs) == 1
    for asset in ("document_manifest", "chunks", "embeddings"):  # batched, still one per shard
        records = instance.fetch_materializations(dg.AssetKey(asset), limit=1000).records
        assert sorted(r.partition_key for r in records) == sorted(shard_key(s) for s in range(N))
    rep2 = index_via_dagster(dset, dset.source_path)
    assert rep2.chunks_embedded == 0 and rep2.shards_refreshed == 0
    assert len(instance.get_runs()) == 1  # no change: no run launched
    write(dset.source_path / "d07.md", "# Seven\n\nchanged", mtime_ns=5 * 10**18)
    rep3 = index_via_dagster(dset, dset.source_path)
    assert rep3.docs_modified == 1 and rep3.shards_refreshed == 1
    runs = instance.get_runs()
    assert len(runs) == 2 and runs[0].tags.get("dagster/partition") == shard_key(shard_of("d07.md", N))


def test_contiguous_ranges():
    assert contiguous_ranges([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 7), (9, 10)]
    assert contiguous_ranges([0, 2, 4, 6, 8]) == [(0, 8)]  # many small ranges collapse into one run
    assert contiguous_ranges([]) == []


def test_settings_env_controls_shards_and_intervals(monkeypatch):
    monkeypatch.setenv("RAG_SHARDS", "16")
    monkeypatch.setenv("RAG_SOURCE_SENSOR_INTERVAL_S", "3")
    s = Settings.from_env()
    assert s.shards == 16
    sensors = {x.name: x for x in build_sensors(s)}
    assert sensors["source_sensor"].minimum_interval_seconds == 3
    raw, _ = build_assets(s)
    assert len(raw.partitions_def.get_partition_keys()) == 16
    assert os.environ["RAG_SHARDS"] == "16"


def test_generation_sensor_finishes_a_generation_left_building(dset, defs, make_db):
    """Under `dagster dev` nothing else would ever switch a generation whose shards all synced but
    whose run died before the switch: the generation sensor requests finish_generation, which does."""
    from rag_assets.pipeline import StageContext, chunk_stage, embed_stage, manifest_stage, plan_scan

    ctx = StageContext.create(dset)
    source = ctx.source()
    plan = plan_scan(ctx.conn, source, N)
    shards = list(range(N))
    manifest_stage(ctx, shards, plan, source)
    chunk_stage(ctx, shards)
    embed_stage(ctx, shards, finalize=False)  # the run "died" here: synced, not switched
    assert live_generation(ctx.conn) is None
    sensor = next(s for s in build_sensors(dset) if s.name == "generation_sensor")
    with dg.instance_for_test() as instance:
        req = sensor(dg.build_sensor_context(instance=instance, resources=resources_for(dset)))
        assert isinstance(req, dg.RunRequest), req
        result = defs.resolve_job_def("finish_generation").execute_in_process(instance=instance, tags=req.tags)
        assert result.success
        assert live_generation(ctx.conn) is not None
        again = sensor(dg.build_sensor_context(instance=instance, resources=resources_for(dset)))
        assert isinstance(again, dg.SkipReason)
    ref = Indexer(replace(dset, database_url=make_db()))
    try:
        ref.refresh(dset.source_path)
        assert index_digest(ctx.conn) == index_digest(ref.conn)
    finally:
        ref.close()
        ctx.conn.close()


def test_every_stage_gets_the_api_key_from_the_embedder_resource(dset, monkeypatch):
    """Before, the manifest and chunk steps built the embedder from the environment alone, so a key
    given only as the resource's EnvVar failed them ("needs RAG_EMBEDDING_API_KEY")."""
    from rag_assets.defs.resources import EmbedderResource
    from tests.fake_openai import FakeOpenAI

    monkeypatch.delenv("RAG_EMBEDDING_API_KEY", raising=False)
    with FakeOpenAI(dims=32, api_key="sk-resource") as srv:
        s = replace(dset, embedder="openai", embedding_base_url=srv.url, embedding_model="fake-model")
        res = {**resources_for(s), "embedder": EmbedderResource(api_key="sk-resource")}
        _, assets = build_assets(s)
        with dg.instance_for_test() as instance:
            result = dg.materialize(assets, instance=instance, resources=res, tags=RANGE)
        assert result.success
        assert srv.request_count > 0


def test_range_run_rebuilds_when_the_sync_strategy_says_so(dset, make_db):
    """Issue 15 through Dagster: the embeddings step chooses the rebuild path itself (the assets only
    pass settings), its checks run on the generation it wrote and pass, its metadata names the choice,
    and the index equals a full rebuild."""
    rebuild = replace(dset, sync_strategy="rebuild")
    with dg.instance_for_test() as instance:
        assert _materialize_all(rebuild, instance).success  # first generation: nothing to choose
        conn = connect_index(dset)
        g1 = live_generation(conn).id
        rng = random.Random(12)
        for i in range(12):
            write(dset.source_path / f"d{i:02d}.md", markdown_doc(rng), mtime_ns=2 * 10**18 + i)
        res = _materialize_all(rebuild, instance)
        assert res.success
        evals = res.get_asset_check_evaluations()
        assert evals and all(e.passed for e in evals), [e.check_name for e in evals if not e.passed]
        mats = [e for e in res.get_asset_materialization_events() if e.asset_key == dg.AssetKey("embeddings")]
        meta = mats[0].materialization.metadata
        assert meta["sync_strategy"].value == "rebuild" and meta["sync_predicted_live_s"].value > 0
    assert live_generation(conn).id != g1
    ref = Indexer(replace(dset, database_url=make_db()))
    ref.refresh(dset.source_path, full=True)
    assert index_digest(conn) == index_digest(ref.conn)


def _ui_state(instance: dg.DagsterInstance, dset: Settings, defs) -> dict:
    """What the asset pages show: partition status, each partition's newest metadata and tags' data
    version, staleness ("unsynced"), and the newest evaluation of every asset check."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    raw, _ = build_assets(dset)
    keys = raw.partitions_def.get_partition_keys()
    graph = defs.resolve_asset_graph()
    stale = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    out: dict = {"status": {}, "meta": {}, "stale": {}, "checks": {}}
    for asset in ("raw_documents", "document_manifest", "chunks", "embeddings"):
        key = dg.AssetKey(asset)
        status = instance.get_status_by_partition(key, partition_keys=keys, partitions_def=raw.partitions_def)
        out["status"][asset] = {p: s.value for p, s in (status or {}).items() if s is not None}
        newest: dict = {}
        for r in instance.fetch_materializations(key, limit=1000).records:  # newest first
            newest.setdefault(r.partition_key, r.asset_materialization)
        out["meta"][asset] = {p: {k: v.value for k, v in m.metadata.items()} for p, m in newest.items()}
        if asset != "raw_documents":
            out["stale"][asset] = {p: stale.get_status(key, p).value for p in newest}
    for check_key in graph.asset_check_keys:
        [rec] = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=1)
        ev = rec.event.dagster_event.event_specific_data
        out["checks"][check_key.name] = {"passed": ev.passed, "target": ev.target_materialization_data}
    return out


def test_cli_record_gives_the_ui_what_a_run_gives(dset, make_db, monkeypatch):
    """The CLI's default refresh (the core, then runless events) and an in-process Dagster run of the
    same refreshes leave the same partition status, per-shard metadata, staleness and check results;
    the index is the core's (digest = a full rebuild)."""
    from rag_assets.defs.recorded import index_recorded
    from rag_assets.defs.report import RUN_ID_TAG

    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)
    import shutil

    docs = dset.source_path.parent / "docs-run"
    shutil.copytree(dset.source_path, docs)  # copies keep the mtimes: the same scan on both paths
    other = replace(dset, database_url=make_db(), home=dset.home.parent / "home-run", source_path=docs)
    states = {}
    for label, s in (("recorded", dset), ("run", other)):
        home = s.home / "dh"
        home.mkdir(parents=True)
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        refresh = (
            (lambda s=s: index_recorded(s, s.source_path, record="wait"))
            if label == "recorded"
            else (lambda s=s: index_via_dagster(s, s.source_path))
        )
        first = refresh()
        assert first.docs_added == 24 and first.chunks_embedded > 0
        write(s.source_path / "d07.md", "# Seven\n\nchanged once more", mtime_ns=5 * 10**18)
        refresh()
        instance = dg.DagsterInstance.from_config(str(home))
        states[label] = _ui_state(instance, s, build_defs(s, resources=resources_for(s)))
        if label == "recorded":
            assert instance.get_runs() == []  # no run: runless events only
            conn = connect_index(s)
            assert conn.execute("SELECT count(*) FROM dagster_outbox").fetchone()[0] == 0
            records = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=1).records
            assert records[0].asset_materialization.tags[RUN_ID_TAG] == conn.execute(
                "SELECT run_id FROM runs ORDER BY id DESC LIMIT 1"
            ).fetchone()[0]
            ref = Indexer(replace(s, database_url=make_db()))
            ref.refresh(s.source_path, full=True)
            assert index_digest(conn) == index_digest(ref.conn)
            ref.close()
            conn.close()
    rec, run = states["recorded"], states["run"]
    shard7 = shard_key(shard_of("d07.md", N))
    assert rec["status"] == run["status"]
    assert set(rec["status"]["embeddings"].values()) == {"MATERIALIZED"} and shard7 in rec["status"]["embeddings"]
    for asset in ("document_manifest", "chunks", "embeddings"):
        assert rec["meta"][asset].keys() == run["meta"][asset].keys()  # the same partitions
        for p, meta in rec["meta"][asset].items():
            theirs = run["meta"][asset][p]
            assert set(meta) <= set(theirs), set(meta) - set(theirs)  # no key a run would not write
            shared = ("shard_documents", "manifest_version", "shard_chunks", "docs_added", "docs_modified",
                      "chunks_embedded", "tokens_embedded", "chunks_total", "shards_in_run", "chunks_written")
            assert {k: meta[k] for k in shared if k in theirs} == {k: theirs[k] for k in shared if k in theirs}, (asset, p)
    assert rec["meta"]["embeddings"][shard7]["docs_modified"] == 1
    assert rec["stale"] == run["stale"]
    assert set(rec["stale"]["embeddings"].values()) == {"FRESH"}
    assert rec["checks"].keys() == run["checks"].keys() == {
        "manifest_matches_source", "rows_match_chunks", "no_orphan_rows", "vectors_valid", "quality_gate"
    }
    assert all(c["passed"] for c in rec["checks"].values())
    assert all(c["target"] is not None for c in rec["checks"].values())  # each targets its materialization


def test_cli_record_survives_a_dead_reporter_and_reports_once(dset, monkeypatch):
    """A record waits in the outbox until a reporter writes it; a second reporter finds nothing."""
    from rag_assets.defs.recorded import index_recorded
    from rag_assets.defs.report import drain_outbox

    home = dset.home / "dh"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    rep = index_recorded(dset, dset.source_path, record="off")  # the index is updated, nothing recorded
    assert rep.docs_added == 24
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.fetch_materializations(dg.AssetKey("embeddings"), limit=10).records == []
    write(dset.source_path / "d03.md", "# Three\n\nedited", mtime_ns=6 * 10**18)
    conn = connect_index(dset)
    from rag_assets.defs.recorded import build_record, waiting_records, write_outbox

    idx = Indexer(dset)
    r2 = idx.refresh(dset.source_path)
    write_outbox(idx.conn, build_record(idx, r2))  # the reporter "dies" before it runs
    idx.close()
    assert waiting_records(dset) == 1  # what `rag-assets dev` checks before it starts a recorder
    assert drain_outbox(dset) == 1
    assert drain_outbox(dset) == 0 and waiting_records(dset) == 0
    records = instance.fetch_materializations(dg.AssetKey("chunks"), limit=100).records
    assert [r.partition_key for r in records] == [shard_key(shard_of("d03.md", N))]
    assert records[0].asset_materialization.metadata["docs_rechunked"].value == 1
    conn.close()
