"""Hybrid retrieval: Postgres full text beside the vectors, fused by reciprocal rank fusion.

Real Postgres (the conftest fixtures) and the hashing embedder; the corpus is built so that an exact
identifier is in one long document only, where a hashing vector of the identifier alone ranks it low.
"""

from __future__ import annotations

import random

import pytest

from rag_assets import snapshots as S
from rag_assets.query import QueryError, arm_depth, rrf_fuse, search, uses_search_syntax
from rag_assets.store import schema
from rag_assets.store.serving import live_generation
from tests.helpers import RecordingEmbedder, paragraph, write

TERM = "frobnicateWidgetCache"


def _corpus(docs_dir) -> None:
    rng = random.Random(5)
    body = "\n\n".join(paragraph(rng) for _ in range(6))
    write(docs_dir / "target.md", f"---\ntags: [api]\n---\n# Internals\n\n{body} Call {TERM} once.\n")
    for i in range(12):
        write(docs_dir / f"d{i}.md", f"---\ntags: [t{i % 2}]\n---\n# Note {i}\n\n{paragraph(rng)}\n")


def _indexer(settings):
    from rag_assets.pipeline import Indexer

    return Indexer(settings, embedder=RecordingEmbedder(32))


def _rank(res, doc_id: str) -> int | None:
    return next((i for i, h in enumerate(res.results, 1) if h.doc_id == doc_id), None)


def test_rrf_fusion_of_a_known_pair_of_rankings():
    fused = rrf_fuse([["a", "b", "c"], ["c", "a", "d"]], k=60)
    expected = {"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62, "d": 1 / 63}
    assert [key for key, _ in fused] == ["a", "c", "b", "d"]
    assert all(score == pytest.approx(expected[key]) for key, score in fused)
    # a tie goes to the better best rank, then to the id
    assert rrf_fuse([["x", "y"], ["y", "x"]], k=1) == [("x", 1 / 2 + 1 / 3), ("y", 1 / 3 + 1 / 2)]
    with pytest.raises(QueryError, match="rrf_k=0"):
        rrf_fuse([["a"]], k=0)
    assert arm_depth(5) == 20 and arm_depth(10) == 40 and arm_depth(900) == 1000
    assert uses_search_syntax('"a phrase"') and uses_search_syntax("cache -redis")
    assert not uses_search_syntax("How do I make writes atomic?")
    assert not uses_search_syntax("Is exists() or count() cheaper?") and not uses_search_syntax("read-only")


def test_an_exact_term_is_found_by_keyword_and_hybrid_not_by_vector(settings, docs_dir):
    _corpus(docs_dir)
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    vec = search(idx.conn, idx.embedder, TERM, 5, mode="vector")
    kw = search(idx.conn, idx.embedder, TERM, 5, mode="keyword")
    hy = search(idx.conn, idx.embedder, TERM, 5, mode="hybrid")
    assert _rank(vec, "target.md") != 1
    assert [h.doc_id for h in kw.results] == ["target.md"] and kw.results[0].score > 0
    assert _rank(hy, "target.md") == 1 and len(hy.results) == 5
    assert 1 / 61 <= hy.results[0].score <= 2 / 61  # the fused score: keyword rank 1, plus the vector rank's
    assert kw.generation == hy.generation == vec.generation == live_generation(idx.conn).id
    with pytest.raises(QueryError, match="mode 'sparse'"):
        search(idx.conn, idx.embedder, TERM, 5, mode="sparse")


def test_filters_apply_inside_both_arms(settings, docs_dir):
    _corpus(docs_dir)
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    assert search(idx.conn, idx.embedder, TERM, 5, {"tags": "t0"}, mode="keyword").results == []
    hy = search(idx.conn, idx.embedder, TERM, 5, {"tags": "t0"}, mode="hybrid")
    # the keyword arm found nothing under the filter, so every hit came from the filtered vector arm
    assert hy.results and all("t0" in h.metadata["tags"] for h in hy.results)
    hy = search(idx.conn, idx.embedder, f"{TERM} note", 20, {"tags": "api"}, mode="hybrid")
    assert {h.doc_id for h in hy.results} == {"target.md"}


def test_restore_and_rollback_carry_the_full_text_column(settings, docs_dir, tmp_path):
    _corpus(docs_dir)
    idx = _indexer(settings)
    r1 = idx.refresh(docs_dir)
    store = S.FolderStore(tmp_path / "snaps")
    snap = S.create_snapshot(idx.conn, store)
    S.restore_snapshot(idx.conn, store, snap["id"])
    restored = live_generation(idx.conn).id
    assert restored != r1.generation
    for gen in (restored, r1.generation):
        assert schema.generation_text_search_config(idx.conn, gen) == "english"
    assert search(idx.conn, idx.embedder, TERM, 3, mode="keyword").results[0].doc_id == "target.md"
    S.rollback(idx.conn, settings.keep_generations)
    assert live_generation(idx.conn).id == r1.generation
    res = search(idx.conn, idx.embedder, TERM, 3, mode="keyword")
    assert res.generation == r1.generation and res.results[0].doc_id == "target.md"


def test_a_metadata_only_change_does_not_rewrite_item_rows(settings, docs_dir):
    _corpus(docs_dir)
    idx = _indexer(settings)
    gen = idx.refresh(docs_dir).generation
    items = schema.items_table(gen).as_string(idx.conn)
    before = idx.conn.execute(
        f"SELECT chunk_id, ctid::text, tsv::text FROM {items} ORDER BY chunk_id"
    ).fetchall()
    text = (docs_dir / "target.md").read_text().replace("tags: [api]", "tags: [api, internal]")
    write(docs_dir / "target.md", text)
    r = idx.refresh(docs_dir)
    assert r.docs_metadata_only == 1 and r.rows_written == 0
    after = idx.conn.execute(
        f"SELECT chunk_id, ctid::text, tsv::text FROM {items} ORDER BY chunk_id"
    ).fetchall()
    assert after == before
    hit = search(idx.conn, idx.embedder, TERM, 1, {"tags": "internal"}, mode="keyword").results[0]
    assert hit.doc_id == "target.md"


def test_a_generation_without_the_column_still_answers_keyword_queries(settings, docs_dir, caplog):
    _corpus(docs_dir)
    idx = _indexer(settings)
    gen = idx.refresh(docs_dir).generation
    expected = [
        (h.doc_id, h.seq) for h in search(idx.conn, idx.embedder, f"{TERM} note", 5, mode="keyword").results
    ]
    # what an earlier release left: no tsv column, and a view without the full-text columns
    items, pos, docs = (
        t.as_string(idx.conn)
        for t in (schema.items_table(gen), schema.pos_table(gen), schema.docs_table(gen))
    )
    with idx.conn.transaction():
        idx.conn.execute("DROP VIEW items")
        idx.conn.execute(f"ALTER TABLE {items} DROP COLUMN tsv")
        idx.conn.execute(
            f"""CREATE VIEW items AS SELECT i.chunk_id, i.doc_id, i.shard, p.seq, i.text, d.metadata, i.embedding,
                {gen}::integer AS generation FROM {items} i JOIN {pos} p ON p.chunk_id = i.chunk_id
                JOIN {docs} d ON d.doc_id = i.doc_id"""
        )
    assert schema.generation_text_search_config(idx.conn, gen) is None
    with caplog.at_level("WARNING"):
        got = search(idx.conn, idx.embedder, f"{TERM} note", 5, mode="keyword")
    assert [(h.doc_id, h.seq) for h in got.results] == expected
    assert any("predates full-text search" in r.message for r in caplog.records)
    assert _rank(search(idx.conn, idx.embedder, TERM, 5, mode="hybrid"), "target.md") == 1


# Keyword candidates: the rarest words of a question, by the generation's own ANALYZE statistics.
COMMON, RARE, MID = "zorblat", "quuxite", "fribble"


def _frequency_corpus(docs_dir) -> None:
    """Every document holds COMMON; MID is in four; RARE in one, which also holds MID."""
    rng = random.Random(9)
    for i in range(16):
        extra = f" Mind the {MID} here." if i % 4 == 0 else ""
        rare = f" Only this one says {RARE}." if i == 0 else ""
        write(docs_dir / f"f{i:02d}.md", f"# Note {i}\n\n{paragraph(rng)} A {COMMON} line.{extra}{rare}\n")


def _tsv_stats(conn, gen: int) -> dict[str, float]:
    row = conn.execute(
        """SELECT most_common_elems::text::text[], most_common_elem_freqs FROM pg_stats
           WHERE schemaname = current_schema() AND tablename = %s AND attname = 'tsv'""",
        (f"g{gen}_items",),
    ).fetchone()
    return dict(zip(row[0], row[1], strict=False)) if row else {}


def test_a_frequent_word_no_longer_makes_every_chunk_a_candidate(settings, docs_dir):
    from rag_assets.query import search_keyword

    _frequency_corpus(docs_dir)
    idx = _indexer(settings)
    gen = idx.refresh(docs_dir).generation
    stats = _tsv_stats(idx.conn, gen)  # the build analysed the generation's table
    assert stats["zorblat"] == 1.0 and stats["quuxit"] == pytest.approx(1 / 16)
    q = f"Where is the {COMMON} {RARE}?"
    everything = search_keyword(idx.conn, q, 50, candidates=10**9).results
    assert len(everything) == 16  # the any-word query: every chunk holds COMMON
    # a budget of one chunk: RARE (the rarest word, always kept) fills it, so COMMON is left out
    bounded = search_keyword(idx.conn, q, 50, candidates=1).results
    assert [h.doc_id for h in bounded] == ["f00.md"] and bounded[0].score > 1  # holds every word
    assert bounded[0].score == everything[0].score  # ranked by all the words still
    # the default budget (2,000 chunks) leaves a small corpus's any-word answer as it was
    assert [(h.doc_id, h.seq) for h in search_keyword(idx.conn, q, 50).results] == [
        (h.doc_id, h.seq) for h in everything
    ]


def test_chunks_holding_every_word_are_always_candidates_and_first(settings, docs_dir):
    from rag_assets.query import search_keyword

    _frequency_corpus(docs_dir)
    idx = _indexer(settings)
    idx.refresh(docs_dir)
    q = f"{COMMON} {MID}"
    # a budget of four chunks: the rarest word (MID, four chunks) is matched; COMMON only ranks
    got = search_keyword(idx.conn, q, 50, candidates=4).results
    assert sorted(h.doc_id for h in got) == ["f00.md", "f04.md", "f08.md", "f12.md"]
    assert all(h.score > 1 for h in got)  # each holds both words
    wide = search_keyword(idx.conn, q, 50, candidates=10**9).results
    assert [h.doc_id for h in wide[:4]] == [h.doc_id for h in got] and wide[4].score < 1
    # a question whose rarest word is in every chunk ranks at most the budget's chunks
    assert len(search_keyword(idx.conn, COMMON, 50, candidates=4).results) == 4
    assert len(search_keyword(idx.conn, COMMON, 50).results) == 16
    with pytest.raises(QueryError, match="candidates=0"):
        search_keyword(idx.conn, q, 5, candidates=0)


def test_a_generation_without_statistics_matches_any_word(settings, docs_dir):
    """A generation never analysed (an earlier release's, or statistics lost) answers with every word."""
    from rag_assets.query import search_keyword

    _frequency_corpus(docs_dir)
    idx = _indexer(settings)
    gen = idx.refresh(docs_dir).generation
    q = f"{COMMON} {RARE}"
    assert len(search_keyword(idx.conn, q, 50, candidates=16).results) == 1  # COMMON: 1 + 16 > 16
    with idx.conn.transaction():  # what a table never analysed looks like to pg_stats
        idx.conn.execute(
            "DELETE FROM pg_statistic WHERE starelid = %s::regclass", (schema.items_table(gen).as_string(idx.conn),)
        )
    assert _tsv_stats(idx.conn, gen) == {}
    got = search_keyword(idx.conn, q, 50, candidates=16).results
    assert len(got) == 16 and got[0].doc_id == "f00.md" and got[0].score > 1
    hy = search(idx.conn, idx.embedder, q, 5, mode="hybrid")
    assert _rank(hy, "f00.md") is not None and len(hy.results) == 5
