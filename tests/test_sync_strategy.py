"""Issue 15: a refresh writes into the live generation or rebuilds one, whichever the cost model says is
cheaper; both ways give the same index (digest), embed the same texts, and keep readers on the old
generation until the switch."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from rag_assets.embedders.hashing import HashingEmbedder
from rag_assets.pipeline import Indexer
from rag_assets.settings import Settings, SettingsError
from rag_assets.store.serving import index_digest, live_generation
from rag_assets.sync_cost import SyncCosts, SyncWork, decide, predict_live_s, predict_rebuild_s
from tests.helpers import full_rebuild, markdown_doc, write


def _work(gen: int, write_rows: int) -> SyncWork:
    return SyncWork(rows_in_generation=gen, rows_to_write=write_rows, rows_to_delete=write_rows, rows_after=gen)


def test_cost_model_prefers_live_for_small_changes_and_rebuild_for_large_ones():
    costs = SyncCosts(live_row_us=100, copy_row_us=20, build_row_us=30, rebuild_fixed_s=0.5)
    assert decide("auto", _work(35_000, 350), costs).strategy == "live"
    # a rebuild must save at least min_saving_s: a small index stays live even when all of it changes
    no_fixed = replace(costs, rebuild_fixed_s=0.0)
    small = decide("auto", _work(150, 150), no_fixed)
    assert small.strategy == "live" and small.predicted_rebuild_s < small.predicted_live_s
    assert decide("auto", _work(150, 150), replace(no_fixed, min_saving_s=0.0)).strategy == "rebuild"
    big = decide("auto", _work(35_000, 21_000), costs)
    assert big.strategy == "rebuild" and big.predicted_rebuild_s < big.predicted_live_s
    assert big.rows_to_write == 21_000 and "rebuild" in big.reason
    # the live cost grows with the rows written, the rebuild cost with the index
    assert predict_live_s(_work(35_000, 2_000), costs) > predict_live_s(_work(35_000, 1_000), costs)
    assert predict_rebuild_s(_work(70_000, 1_000), costs) > predict_rebuild_s(_work(35_000, 1_000), costs)
    # nothing new to write (deletes, moves, metadata): never a rebuild
    assert decide("auto", SyncWork(35_000, 0, 30_000, 5_000), costs).strategy == "live"
    # forced either way, with the predictions still recorded
    forced = decide("rebuild", _work(35_000, 10), costs)
    assert forced.strategy == "rebuild" and forced.predicted_live_s > 0 and forced.setting == "rebuild"
    assert decide("live", _work(35_000, 30_000), costs).strategy == "live"
    # the coefficients decide: a build made very expensive keeps even a 60% change live
    assert decide("auto", _work(35_000, 21_000), replace(costs, build_row_us=1e4)).strategy == "live"
    with pytest.raises(ValueError, match="RAG_SYNC_STRATEGY"):
        decide("sometimes", _work(1, 1), costs)


def test_sync_settings_are_validated_and_named():
    s = Settings.from_env({"RAG_SYNC_STRATEGY": "rebuild", "RAG_SYNC_LIVE_ROW_US": "120.5", "RAG_HNSW_BUILD_WORKERS": "3"})
    assert (s.sync_strategy, s.sync_live_row_us, s.hnsw_build_workers) == ("rebuild", 120.5, 3)
    assert Settings.from_env({}).hnsw_build_workers is None
    with pytest.raises(SettingsError, match="RAG_SYNC_STRATEGY"):
        Settings.from_env({"RAG_SYNC_STRATEGY": "fast"})
    with pytest.raises(SettingsError, match="RAG_SYNC_BUILD_ROW_US"):
        Settings.from_env({"RAG_SYNC_BUILD_ROW_US": "-1"})
    with pytest.raises(SettingsError, match="RAG_HNSW_BUILD_WORKERS"):
        Settings.from_env({"RAG_HNSW_BUILD_WORKERS": "500"})


def _corpus(root, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(n):
        write(root / f"d{i:04d}.md", markdown_doc(rng), mtime_ns=10**18 + i)


def _change(root, seed: int) -> None:
    """Edit 40% of the documents, delete 5, add 10, change the front matter of 3."""
    rng = random.Random(seed)
    files = sorted(root.glob("d*.md"))
    for f in files[: int(len(files) * 0.4)]:
        write(f, markdown_doc(rng), mtime_ns=2 * 10**18 + int(f.stem[1:]))
    for f in files[-5:]:
        f.unlink()
    for i in range(10):
        write(root / f"new{i}.md", markdown_doc(rng), mtime_ns=3 * 10**18 + i)
    for f in files[-8:-5]:
        write(f, "---\ntitle: Retitled\n---\n" + f.read_text(), mtime_ns=4 * 10**18 + int(f.stem[1:]))


def _indexer(settings: Settings, db: str, strategy: str, **kw) -> Indexer:
    return Indexer(replace(settings, database_url=db, sync_strategy=strategy, **kw), embedder=HashingEmbedder(32))


def test_rebuild_and_live_paths_give_the_same_index_and_embed_the_same_texts(settings, make_db, docs_dir):
    _corpus(docs_dir, 120, seed=1)
    live_idx = _indexer(settings, make_db(), "live")
    rebuild_idx = _indexer(settings, make_db(), "rebuild")
    for idx in (live_idx, rebuild_idx):
        first = idx.refresh(docs_dir)
        assert first.sync_strategy == "new"  # the first generation: nothing to choose
    g_before = live_generation(rebuild_idx.conn).id
    old_digest = index_digest(rebuild_idx.conn)
    _change(docs_dir, seed=2)
    a = live_idx.refresh(docs_dir)
    b = rebuild_idx.refresh(docs_dir)
    assert (a.sync_strategy, b.sync_strategy) == ("live", "rebuild")
    assert b.sync_decision["rows_to_write"] == a.rows_written > 0
    assert b.sync_decision["predicted_live_s"] > 0 and b.sync_decision["predicted_rebuild_s"] > 0
    # minimal work: the rebuild copied vectors, it embedded nothing more than the live path
    assert b.chunks_embedded == a.chunks_embedded > 0 and b.tokens_embedded == a.tokens_embedded
    assert b.generation_switched and b.generation != g_before and b.seconds_copy > 0
    assert not a.generation_switched and a.generation == live_generation(live_idx.conn).id
    assert index_digest(rebuild_idx.conn) == index_digest(live_idx.conn) != old_digest
    ref = full_rebuild(settings, make_db(), docs_dir)
    assert index_digest(rebuild_idx.conn) == index_digest(ref.conn)
    # the old generation is retired with its tables (a rollback point), nothing is left building
    states = dict(rebuild_idx.conn.execute("SELECT id, state FROM generations").fetchall())
    assert states[g_before] == "retired" and "building" not in states.values()
    # readers query the new generation through the view, its HNSW index exists
    assert rebuild_idx.conn.execute("SELECT DISTINCT generation FROM items").fetchall() == [(b.generation,)]
    hnsw = rebuild_idx.conn.execute(
        "SELECT count(*) FROM pg_indexes WHERE tablename = %s AND indexdef LIKE '%%hnsw%%'", (f"g{b.generation}_items",)
    ).fetchone()[0]
    assert hnsw == 1
    # the decision is recorded with the run
    stats = rebuild_idx.conn.execute("SELECT stats FROM runs WHERE stage = 'refresh' ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert stats["sync_strategy"] == "rebuild" and stats["sync_decision"]["setting"] == "rebuild"
    # nothing changed: nothing embedded, no new generation, no run
    again = rebuild_idx.refresh(docs_dir)
    assert again.chunks_embedded == 0 and not again.generation_switched and again.generation == b.generation
    for idx in (live_idx, rebuild_idx, ref):
        idx.close()


def test_auto_follows_the_measured_coefficients(settings, make_db, docs_dir):
    """The same 40% change: auto rebuilds when the build is cheap, writes live when it is dear."""
    _corpus(docs_dir, 80, seed=3)
    cheap = _indexer(
        settings, make_db(), "auto", sync_build_row_us=0.01, sync_copy_row_us=0.01, sync_rebuild_fixed_s=0.0,
        sync_min_saving_s=0.0,
    )
    dear = _indexer(settings, make_db(), "auto", sync_build_row_us=1e5)
    for idx in (cheap, dear):
        idx.refresh(docs_dir)
    _change(docs_dir, seed=4)
    r_cheap, r_dear = cheap.refresh(docs_dir), dear.refresh(docs_dir)
    assert (r_cheap.sync_strategy, r_dear.sync_strategy) == ("rebuild", "live")
    assert r_cheap.sync_decision["setting"] == "auto" and "predicted" in r_cheap.sync_decision["reason"]
    assert index_digest(cheap.conn) == index_digest(dear.conn)
    # a refresh with no new rows (only deletions) stays live whatever the coefficients
    for f in sorted(docs_dir.glob("d*.md"))[:3]:
        f.unlink()
    r = cheap.refresh(docs_dir)
    assert r.sync_strategy == "live" and r.sync_decision["rows_to_write"] == 0 and r.rows_deleted > 0
    for idx in (cheap, dear):
        idx.close()


def test_rebuild_skips_the_quality_gate_of_model_changes(settings, make_db, docs_dir, tmp_path):
    """A rebuild of the live configuration is an ordinary refresh: a question set that the new
    content answers worse must not block it (the gate compares models and chunkers)."""
    _corpus(docs_dir, 40, seed=5)
    first = sorted(docs_dir.glob("d*.md"))[0]
    write(first, "# Zebras\n\n" + "zebras graze on the savanna at dawn. " * 30, mtime_ns=5 * 10**18)
    qs = tmp_path / "q.jsonl"
    q = {"id": "z", "question": "where do zebras graze at dawn", "relevant_docs": [first.name], "split": "dev"}
    qs.write_text(json.dumps(q) + "\n")
    idx = _indexer(
        settings, make_db(), "rebuild", quality_questions=str(qs), quality_tolerance=0.0, quality_k=1, retrieval_mode="vector",
        embedding_dimensions=32,
    )
    g1 = idx.refresh(docs_dir).generation
    from rag_assets.quality_gate import measure, recorded_recall

    assert recorded_recall(idx.conn, g1) == 1.0
    # the one relevant document now speaks of something else: recall@k falls to 0
    write(first, markdown_doc(random.Random(9)), mtime_ns=6 * 10**18)
    write(docs_dir / "zebras.md", "# Zebras\n\n" + "zebras graze on the savanna at dawn. " * 30, mtime_ns=7 * 10**18)
    r = idx.refresh(docs_dir)
    assert r.sync_strategy == "rebuild" and r.generation_switched
    assert measure(idx.settings, r.generation) == 0.0  # what a gate would have refused
    ref = full_rebuild(settings, make_db(), docs_dir)
    assert index_digest(idx.conn) == index_digest(ref.conn)
    idx.close()
    ref.close()
