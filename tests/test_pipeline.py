"""The core against a real PostgreSQL + pgvector: equivalence, minimal work, deletes, bad input."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from rag_assets.embedders.base import EmbedStats
from rag_assets.pipeline import Indexer, IndexingError
from rag_assets.query import search
from rag_assets.sources import FolderSource
from rag_assets.store.db import connect
from rag_assets.store.serving import index_digest, shard_digests
from rag_assets.store.source_binding import SourceMismatch
from tests.conftest import TEST_SCHEMA
from tests.helpers import RecordingEmbedder, WrongDimEmbedder, full_rebuild, markdown_doc, paragraph, write


def _indexer(settings, dims=32, **kw):
    return Indexer(settings, embedder=RecordingEmbedder(dims), **kw)


def _rows(conn):
    return conn.execute(
        "SELECT doc_id, seq, text, metadata, embedding::text FROM items ORDER BY doc_id, seq"
    ).fetchall()


def test_first_index_then_no_change_does_nothing(settings, docs_dir):
    rng = random.Random(1)
    for i in range(12):
        write(docs_dir / f"d{i}.md", markdown_doc(rng))
    idx = _indexer(settings)
    r1 = idx.refresh(docs_dir)
    assert r1.docs_added == 12 and r1.docs_total == 12 and r1.chunks_total > 12
    assert r1.generation_switched and r1.generation is not None
    n_texts = len(idx.embedder.texts)
    assert n_texts == len(set(idx.embedder.texts)) == r1.chunks_embedded
    r2 = idx.refresh(docs_dir)
    assert (r2.docs_unchanged, r2.chunks_embedded, r2.rows_written, r2.rows_deleted, r2.shards_refreshed) == (
        12,
        0,
        0,
        0,
        0,
    )
    assert len(idx.embedder.texts) == n_texts  # zero embedder calls


def test_one_paragraph_edit_reembeds_about_one_chunk(settings, docs_dir):
    rng = random.Random(2)
    text = markdown_doc(rng, sections=12)
    write(docs_dir / "long.md", text)
    idx = _indexer(settings)
    r1 = idx.refresh(docs_dir)
    paras = text.split("\n\n")
    k = len(paras) // 2
    paras[k] = paras[k] + " An edited sentence."
    write(docs_dir / "long.md", "\n\n".join(paras))
    before = len(idx.embedder.texts)
    r2 = idx.refresh(docs_dir)
    assert r2.docs_modified == 1
    assert 1 <= r2.chunks_embedded <= 2 < r1.chunks_embedded
    assert len(idx.embedder.texts) - before == r2.chunks_embedded


def test_metadata_only_change_updates_rows_without_embedding(settings, docs_dir):
    write(
        docs_dir / "g.md", "---\ntags: [old]\n---\n# Guide\n\n" + paragraph(random.Random(3)), mtime_ns=10**18
    )
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    write(
        docs_dir / "g.md",
        "---\ntags: [new]\n---\n# Guide\n\n" + paragraph(random.Random(3)),
        mtime_ns=10**18 + 1,
    )
    before = len(idx.embedder.texts)
    r = idx.refresh(docs_dir)
    assert r.docs_metadata_only == 1 and r.docs_modified == 0
    assert r.chunks_embedded == 0 and r.rows_written == 0 and len(idx.embedder.texts) == before
    tags = {tuple(m["tags"]) for (m,) in idx.conn.execute("SELECT metadata FROM items").fetchall()}
    assert tags == {("new",)}


def test_deletes_propagate_to_rows_and_queries(settings, docs_dir):
    write(docs_dir / "keep.md", "# Keep\n\nalpha beta gamma")
    write(docs_dir / "drop.md", "# Drop\n\nzebra quagga okapi")
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    assert search(idx.conn, idx.embedder, "zebra quagga", 5).results[0].doc_id == "drop.md"
    (docs_dir / "drop.md").unlink()
    r = idx.refresh(docs_dir)
    assert r.docs_deleted == 1 and r.rows_deleted >= 1
    assert {h.doc_id for h in search(idx.conn, idx.embedder, "zebra quagga", 5).results} == {"keep.md"}
    assert idx.conn.execute("SELECT count(*) FROM manifest WHERE doc_id = 'drop.md'").fetchone()[0] == 0


def test_minimal_work_only_cache_misses_reach_the_embedder(settings, docs_dir):
    rng = random.Random(4)
    shared = paragraph(rng)
    a_text = f"# A\n\n{shared}\n\n{paragraph(rng)}"
    write(docs_dir / "a.md", a_text)
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    cached = {h for (h,) in idx.conn.execute("SELECT chunk_hash FROM rag_cache.embedding_cache")}
    # b.md repeats a's text exactly (same chunks) plus a new section.
    write(docs_dir / "b.md", f"{a_text}\n\n# New\n\n{paragraph(rng)}")
    before = len(idx.embedder.texts)
    r = idx.refresh(docs_dir)
    sent = idx.embedder.texts[before:]
    import hashlib

    sent_hashes = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in sent]
    assert len(sent_hashes) == len(set(sent_hashes)) == r.chunks_embedded
    assert not set(sent_hashes) & cached  # nothing already cached was sent
    now = {h for (h,) in idx.conn.execute("SELECT DISTINCT chunk_hash FROM chunks")}
    assert now - cached == set(sent_hashes)  # and every miss was sent
    assert r.chunks_reused >= 1


def test_bad_input_is_reported_and_loses_nothing_else(settings, docs_dir):
    s = replace(settings, max_doc_bytes=10 * 1024 * 1024)
    write(docs_dir / "good.md", "# Good\n\nfine text here")
    write(docs_dir / "binary.md", b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    write(docs_dir / "latin1.md", "caf\xe9 cr\xe8me".encode("latin-1"))
    write(docs_dir / "empty.md", "")
    write(docs_dir / "whitespace.md", "  \n\n \n")
    write(docs_dir / "huge.md", b"word " * (50 * 1024 * 1024 // 5))  # 50 MB
    hostile = ['it\'s "q".md', "..dots..md", "spa ce.md", "ünï 文書.md", "back\\slash.md"]
    for h in hostile:
        write(docs_dir / h, f"# {h}\n\nhostile id {h}")
    idx = _indexer(s)
    r = idx.refresh(docs_dir)
    errs = {e["doc_id"]: e["error"] for e in r.errors}
    assert set(errs) == {"binary.md", "latin1.md", "huge.md"}
    assert "binary" in errs["binary.md"] and "UTF-8" in errs["latin1.md"] and "too large" in errs["huge.md"]
    indexed = {d for (d,) in idx.conn.execute("SELECT DISTINCT doc_id FROM items")}
    assert indexed == {"good.md", *hostile}
    assert r.docs_total == 3 + len(hostile)  # good, empty and whitespace are documents with no chunks
    # a later good version replaces the error; the bad ones keep being reported, nothing else changes
    write(docs_dir / "binary.md", "# Fixed\n\nnow text")
    r2 = idx.refresh(docs_dir)
    assert {e["doc_id"] for e in r2.errors} == {"latin1.md", "huge.md"}
    assert r2.docs_added == 1


def test_a_file_that_turns_bad_keeps_its_last_good_version(settings, docs_dir):
    write(docs_dir / "a.md", "# A\n\ngood text")
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    digest = index_digest(idx.conn)
    write(docs_dir / "a.md", b"\x00binary now")
    r = idx.refresh(docs_dir)
    assert [e["doc_id"] for e in r.errors] == ["a.md"]
    assert index_digest(idx.conn) == digest


def test_file_deleted_while_the_run_reads_the_folder(settings, docs_dir):
    for n in ("a.md", "b.md", "c.md"):
        write(docs_dir / n, f"# {n}\n\ntext of {n}")

    class Vanishing(FolderSource):
        def read(self, doc_id, expected=None):
            (docs_dir / "c.md").unlink(missing_ok=True)  # another process deletes c.md mid-run
            return super().read(doc_id, expected)

    idx = _indexer(settings)
    idx.source = lambda path=None, change_source=False: Vanishing(docs_dir, settings.include)
    r = idx.refresh(docs_dir)
    assert r.errors == []
    indexed = {d for (d,) in idx.conn.execute("SELECT DISTINCT doc_id FROM items")}
    assert "c.md" not in indexed and {"a.md", "b.md"} <= indexed | {"c.md"}


def test_wrong_dimension_embedder_commits_nothing(settings, docs_dir):
    write(docs_dir / "a.md", "# A\n\nfirst version")
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    digest = index_digest(idx.conn)
    write(docs_dir / "b.md", "# B\n\nnew document")
    bad = Indexer(settings, conn=idx.conn, embedder=WrongDimEmbedder(32))
    with pytest.raises(IndexingError, match="expected vectors of dimension 32, got 33"):
        bad.refresh(docs_dir)
    assert index_digest(idx.conn) == digest
    assert (
        idx.conn.execute(
            "SELECT count(*) FROM rag_cache.embedding_cache WHERE embedding IS NOT NULL AND vector_dims(embedding) <> 32"
        ).fetchone()[0]
        == 0
    )
    r = idx.refresh(docs_dir)  # the good embedder converges
    assert r.docs_total == 2


def test_incremental_matches_full_rebuild_and_queries_match(settings, docs_dir, make_db):
    rng = random.Random(5)
    for i in range(20):
        write(docs_dir / f"sub{i % 3}/d{i}.md", markdown_doc(rng))
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    for i in range(0, 20, 4):
        write(docs_dir / f"sub{i % 3}/d{i}.md", markdown_doc(rng))
    (docs_dir / "sub1/d1.md").unlink()
    idx.refresh(docs_dir)
    ref = full_rebuild(settings, make_db(), docs_dir)
    assert index_digest(idx.conn) == index_digest(ref.conn)
    assert shard_digests(idx.conn) == shard_digests(ref.conn)
    for q in ("vector index shard", "webhook retry budget", "postgres schema"):
        a = [(h.doc_id, h.seq, h.score) for h in search(idx.conn, idx.embedder, q, 5, exact=True).results]
        b = [(h.doc_id, h.seq, h.score) for h in search(ref.conn, ref.embedder, q, 5, exact=True).results]
        assert a == b


def test_full_rebuild_switches_generation_and_keeps_serving(settings, docs_dir):
    write(docs_dir / "a.md", "# A\n\nalpha")
    idx = _indexer(settings)
    r1 = idx.refresh(docs_dir)
    digest = index_digest(idx.conn)
    r2 = idx.refresh(docs_dir, full=True)
    assert r2.generation == r1.generation + 1 and r2.generation_switched
    assert r2.chunks_embedded == 0  # the cache is content-addressed: a rebuild pays nothing
    assert index_digest(idx.conn) == digest


def test_shard_count_change_is_refused(settings, docs_dir):
    write(docs_dir / "a.md", "x")
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    from rag_assets.settings import SettingsError

    with pytest.raises(SettingsError, match="RAG_SHARDS=9 but this index was built with 8"):
        Indexer(replace(settings, shards=9), conn=idx.conn, embedder=RecordingEmbedder(32))


# --- property-based equivalence -------------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["add", "edit", "delete", "rename", "meta", "noop", "append_para", "wrong_root", "background"]
        ),
        st.integers(0, 7),
        st.integers(0, 10**6),
    ),
    min_size=1,
    max_size=6,
)


@hsettings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, seed=st.integers(0, 10**6))
def test_property_incremental_equals_full_rebuild(settings, tmp_path_factory, make_db, ops, seed):
    rng = random.Random(seed)
    root = tmp_path_factory.mktemp("prop")
    live: dict[str, int] = {}  # name -> tag counter
    tick = [10**18]

    def put(name: str, body: str, tags: int) -> None:
        tick[0] += 1000
        write(root / name, f"---\ntags: [t{tags}]\n---\n{body}", mtime_ns=tick[0])

    for i in range(4):
        put(f"f{i}.md", markdown_doc(rng), 0)
        live[f"f{i}.md"] = 0
    s = replace(settings, database_url=make_db())
    idx = Indexer(s, embedder=RecordingEmbedder(32))
    idx.refresh(root)
    for op, k, r in ops:
        names = sorted(live)
        name = names[k % len(names)] if names else None
        if op == "add" or name is None:
            new = f"n{r}.md"
            put(new, markdown_doc(random.Random(r)), 0)
            live[new] = 0
        elif op == "edit":
            put(name, markdown_doc(random.Random(r)), live[name])
        elif op == "append_para":
            body = (root / name).read_text().split("---\n", 2)[2]
            put(name, body + "\n\n" + paragraph(random.Random(r)), live[name])
        elif op == "delete":
            (root / name).unlink()
            del live[name]
        elif op == "rename":
            new = f"r{r}.md"
            (root / name).rename(root / new)
            live[new] = live.pop(name)
        elif op == "meta":
            body = (root / name).read_text().split("---\n", 2)[2]
            live[name] += 1
            put(name, body, live[name])
        elif op == "wrong_root":  # a mistyped path: refused, nothing changes, the index keeps its root
            other = tmp_path_factory.mktemp("other")
            write(other / "x.md", markdown_doc(random.Random(r)))
            d0 = index_digest(idx.conn)
            with pytest.raises(SourceMismatch):
                idx.refresh(other)
            assert index_digest(idx.conn) == d0
        before = len(idx.embedder.texts)
        # "background": the path sensors and the service take (no folder given; RAG_SOURCE_PATH is
        # another folder): the index's own root is read
        rep = idx.refresh(None if op == "background" else root)
        assert len(idx.embedder.texts) - before == rep.chunks_embedded
        if op == "meta":
            assert rep.chunks_embedded == 0
        if op == "noop":
            assert rep.chunks_embedded == 0
        ref = full_rebuild(s, make_db(), root)
        assert index_digest(idx.conn) == index_digest(ref.conn), f"after {op}"
        assert _rows(idx.conn) == _rows(ref.conn)
        q = [
            (h.doc_id, h.seq)
            for h in search(idx.conn, idx.embedder, "vector shard query", 5, exact=True).results
        ]
        qr = [
            (h.doc_id, h.seq)
            for h in search(ref.conn, ref.embedder, "vector shard query", 5, exact=True).results
        ]
        assert q == qr
        ref.close()
    idx.close()


def test_query_filter_returns_k_when_k_exist(settings, docs_dir):
    rng = random.Random(7)
    for i in range(30):
        tag = "rare" if i % 10 == 0 else "common"
        write(docs_dir / f"d{i}.md", f"---\ntags: [{tag}]\naudience: ops\n---\n" + markdown_doc(rng, 3))
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    n_rare = idx.conn.execute(
        'SELECT count(*) FROM items WHERE metadata @> \'{"tags": ["rare"]}\''
    ).fetchone()[0]
    res = search(idx.conn, idx.embedder, "vector shard", 5, {"tags": "rare"})
    assert len(res.results) == min(5, n_rare)
    assert all("rare" in h.metadata["tags"] for h in res.results)
    assert len(search(idx.conn, idx.embedder, "vector", 3, {"audience": "ops"}).results) == 3
    assert search(idx.conn, idx.embedder, "vector", 3, {"audience": "nobody"}).results == []


def test_query_before_any_index_is_a_clear_error(settings):
    from rag_assets.query import QueryError

    idx = _indexer(settings)
    with pytest.raises(QueryError, match="index is empty"):
        search(idx.conn, idx.embedder, "anything", 3)


def test_embed_stats_count_texts(settings, docs_dir):
    write(docs_dir / "a.md", "# A\n\nalpha beta")
    idx = _indexer(settings)
    r = idx.refresh(docs_dir)
    assert r.embedding["texts"] == r.chunks_embedded
    assert r.tokens_embedded > 0
    assert isinstance(EmbedStats().as_dict(), dict)


def test_concurrent_refreshes_do_not_corrupt(settings, docs_dir, db_url):
    import threading

    rng = random.Random(8)
    for i in range(40):
        write(docs_dir / f"d{i}.md", markdown_doc(rng))
    errors: list[BaseException] = []

    def run():
        try:
            i = Indexer(settings, conn=connect(db_url, schema=TEST_SCHEMA), embedder=RecordingEmbedder(32))
            i.refresh(docs_dir)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    # schema first (one process), then two concurrent refreshes of the same folder
    _indexer(settings).conn.close()
    ts = [threading.Thread(target=run) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    dup = idx.conn.execute("SELECT count(*) - count(DISTINCT (doc_id, seq)) FROM items").fetchone()[0]
    assert dup == 0
    assert idx.conn.execute("SELECT count(DISTINCT doc_id) FROM items").fetchone()[0] == 40


def test_hnsw_build_memory_is_sized_to_the_graph():
    from rag_assets.store.schema import hnsw_build_memory_mb

    assert hnsw_build_memory_mb(7_000, 256) == 64 + 15  # small: next to nothing
    big = hnsw_build_memory_mb(456_000, 256)
    assert 900 < big < 1200  # the 100k-document backfill's generation: more than the old fixed 512 MB
    assert hnsw_build_memory_mb(456_000, 256, m=32) > big
    assert hnsw_build_memory_mb(50_000_000, 1536) == 2048  # capped (RAG_HNSW_BUILD_MEMORY_MB)
    assert hnsw_build_memory_mb(50_000_000, 1536, cap_mb=8192) == 8192


def test_merged_embedding_stats_keep_the_smallest_learned_batch_size():
    from rag_assets.pipeline import _merge_embedding

    a = {"requests": 3, "batch_splits": 1, "batch_size_limit": 4, "latency_p95_ms": 10.0}
    b = {"requests": 2, "batch_splits": 0, "batch_size_limit": 4, "latency_p95_ms": 30.0}
    m = _merge_embedding(_merge_embedding({}, a), b)
    assert m == {"requests": 5, "batch_splits": 1, "batch_size_limit": 4, "latency_p95_ms": 30.0}
    assert _merge_embedding(m, {"batch_size_limit": 2})["batch_size_limit"] == 2
    assert _merge_embedding(m, {"batch_size_limit": None})["batch_size_limit"] == 4


_GUIDE = """# Guide

The guide explains how shards and vectors fit together in the index.

## Install

Install the package from the registry and point it at a database.

### From source

Clone the repository and install it in a virtual environment with the test extras.

## Usage

Run the index command on a folder; the query command answers questions over it.

## Snapshots

Snapshots copy every shard to a folder or a bucket and restore them atomically.
"""


def test_renaming_a_heading_reembeds_exactly_the_chunks_under_it(settings, docs_dir):
    write(docs_dir / "guide.md", _GUIDE)
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    assert idx.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 5  # one per section
    write(docs_dir / "guide.md", _GUIDE.replace("## Install\n", "## Installation\n"))
    before = len(idx.embedder.texts)
    r = idx.refresh(docs_dir)
    new = idx.embedder.texts[before:]
    # "Install" and its subsection "From source" carry the renamed title in their heading path
    assert r.docs_modified == 1 and r.chunks_embedded == 2 == len(new)
    assert sorted(t.split("\n\n", 1)[0] for t in new) == [
        "Guide \u203a Installation",
        "Guide \u203a Installation \u203a From source",
    ]
    hits = search(idx.conn, idx.embedder, "clone the repository virtual environment", 5, mode="keyword").results
    assert hits[0].metadata["heading_path"] == ["Guide", "Installation", "From source"]
    assert hits[0].text.startswith("Guide \u203a Installation \u203a From source\n\n### From source\n\nClone")


def test_an_edit_inside_one_section_reembeds_only_that_chunk(settings, docs_dir):
    write(docs_dir / "guide.md", _GUIDE)
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    write(docs_dir / "guide.md", _GUIDE.replace("answers questions over it.", "answers questions over it, fast."))
    before = len(idx.embedder.texts)
    r = idx.refresh(docs_dir)
    assert r.chunks_embedded == 1 and r.chunks_reused == 0
    (text,) = idx.embedder.texts[before:]
    assert text.startswith("Guide \u203a Usage\n\n## Usage\n\n") and "fast." in text
    # a heading-only or label-only chunk never appears in the index
    write(docs_dir / "labels.md", "(top)=\n\n# Labels\n\n(sub)=\n\n## Sub\n\nThe only text.\n")
    idx.refresh(docs_dir)
    rows = idx.conn.execute("SELECT text FROM chunks WHERE doc_id = 'labels.md'").fetchall()
    assert rows == [("Labels \u203a Sub\n\n(top)=\n\n# Labels\n\n(sub)=\n\n## Sub\n\nThe only text.",)]
