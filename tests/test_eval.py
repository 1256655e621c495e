"""Retrieval quality: the metrics (hand-computed values and properties), the shipped question sets,
and ``rag-assets eval`` end to end against a real index of ``samples/corpus``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rag_assets.eval import (
    EvalError,
    QuestionSetError,
    dedupe,
    evaluate,
    load_questions,
    missing_docs,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
)
from rag_assets.pipeline import Indexer
from rag_assets.sources import FolderSource
from tests.helpers import write

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples/corpus"
SAMPLE_SET = ROOT / "samples/questions/corpus.jsonl"
DJANGO_SET = ROOT / "benchmarks/questions/django-5.0.jsonl"
README_QUESTION = "How do I make a group of database writes atomic?"


# --- metrics: hand-computed values -------------------------------------------------------------


def test_dedupe_keeps_each_doc_at_its_first_rank():
    assert dedupe(["a", "b", "a", "c", "b", None, "d", None]) == ["a", "b", "c", None, "d", None]


def test_recall_counts_relevant_docs_within_k():
    ranked = ["x", "a", "y", "b", "z"]
    assert recall_at_k(ranked, {"a", "b", "c"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, {"a", "b", "c"}, 4) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, {"a", "b", "c"}, 10) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, {"q"}, 5) == 0.0


def test_mrr_is_the_reciprocal_rank_of_the_first_hit():
    assert mrr_at_k(["x", "y", "a", "b"], {"a", "b"}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["x", "y", "a"], {"a"}, 2) == 0.0
    assert mrr_at_k(["a"], {"a"}, 1) == 1.0
    assert mrr_at_k([None, "a"], {"a"}, 5) == 0.5


def test_ndcg_by_hand():
    # relevant at ranks 2 and 4 of 2 relevant: DCG = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3)
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["x", "a", "y", "b"], {"a", "b"}, 10) == pytest.approx(expected)
    assert expected == pytest.approx(0.6509209298)
    # k smaller than the relevant set: the ideal ranking has only k relevant entries
    assert ndcg_at_k(["a", "x"], {"a", "b", "c"}, 1) == 1.0
    assert ndcg_at_k(["x", "a"], {"a", "b", "c"}, 2) == pytest.approx(
        (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    )


def test_metrics_refuse_an_empty_label_or_k_below_one():
    with pytest.raises(ValueError, match="relevant"):
        recall_at_k(["a"], set(), 5)
    with pytest.raises(ValueError, match="k=0"):
        ndcg_at_k(["a"], {"a"}, 0)


# --- metrics: properties -----------------------------------------------------------------------

ids = st.sampled_from([f"d{i}" for i in range(12)])
rankings = st.lists(st.one_of(ids, st.none()), max_size=20).map(dedupe)
labels = st.sets(ids, min_size=1, max_size=6)
ks = st.integers(min_value=1, max_value=25)


@given(rankings, labels, ks)
def test_every_metric_lies_between_0_and_1(ranked, relevant, k):
    for metric in (recall_at_k, mrr_at_k, ndcg_at_k):
        assert 0.0 <= metric(ranked, relevant, k) <= 1.0 + 1e-12


@given(labels, st.lists(ids, max_size=8), ks)
def test_a_perfect_ranking_scores_1(relevant, tail, k):
    ranked = dedupe(sorted(relevant) + tail)
    assert mrr_at_k(ranked, relevant, k) == 1.0
    assert ndcg_at_k(ranked, relevant, k) == pytest.approx(1.0)
    if k >= len(relevant):
        assert recall_at_k(ranked, relevant, k) == 1.0


@given(rankings, labels, ks)
def test_recall_and_mrr_never_drop_as_k_grows(ranked, relevant, k):
    assert recall_at_k(ranked, relevant, k) <= recall_at_k(ranked, relevant, k + 1)
    assert mrr_at_k(ranked, relevant, k) <= mrr_at_k(ranked, relevant, k + 1)


@given(rankings, labels, ks)
def test_no_relevant_doc_in_the_top_k_scores_0(ranked, relevant, k):
    ranked = [r for r in ranked if r not in relevant]
    assert (
        recall_at_k(ranked, relevant, k)
        == mrr_at_k(ranked, relevant, k)
        == ndcg_at_k(ranked, relevant, k)
        == 0
    )


# --- the shipped question sets -----------------------------------------------------------------


def _split_rule(qid: str) -> str:
    """samples/questions/README.md: dev when the first 8 hex digits of sha256(id), mod 10, are < 4."""
    return "dev" if int(hashlib.sha256(qid.encode()).hexdigest()[:8], 16) % 10 < 4 else "report"


def test_samples_set_labels_only_documents_of_the_corpus():
    qs = load_questions(SAMPLE_SET)
    assert len(qs) >= 60
    corpus = FolderSource(SAMPLES, include=["**/*.md", "**/*.rst"]).scan().stats
    assert missing_docs(qs, corpus) == []
    assert {d for q in qs for d in q.relevant_docs} == set(corpus), "every document is asked about"
    readme = [q for q in qs if q.question == README_QUESTION]
    assert [q.relevant_docs for q in readme] == [("django/topics/db/transactions.rst",)]
    assert sum(len(q.relevant_docs) > 1 for q in qs) >= 10, "multi-document questions"


@pytest.mark.parametrize("path,minimum", [(SAMPLE_SET, 60), (DJANGO_SET, 100)])
def test_sets_are_split_by_the_stated_rule(path, minimum):
    qs = load_questions(path)
    assert len(qs) >= minimum
    assert all(q.split == _split_rule(q.id) for q in qs)
    dev = sum(q.split == "dev" for q in qs) / len(qs)
    assert 0.3 <= dev <= 0.5
    assert len(load_questions(path, "dev")) + len(load_questions(path, "report")) == len(qs)


def test_django_set_names_django_doc_paths():
    qs = load_questions(DJANGO_SET)
    docs = {d for q in qs for d in q.relevant_docs}
    assert all(d.endswith(".txt") and not d.startswith(("/", "docs/")) for d in docs)
    assert "topics/db/transactions.txt" in docs


@pytest.mark.parametrize(
    "line,message",
    [
        ("not json", "not JSON"),
        ('{"id": "a", "question": "q?", "relevant_docs": ["x"], "split": "test"}', "'split' must be one of"),
        ('{"id": "a", "question": "q?", "relevant_docs": [], "split": "dev"}', "non-empty list"),
        ('{"id": "a", "question": " ", "relevant_docs": ["x"], "split": "dev"}', "'question'"),
        (
            '{"id": "a", "question": "q?", "relevant_docs": ["x"], "split": "dev", "extra": 1}',
            "unknown field",
        ),
        (
            '{"id": "a", "question": "q?", "relevant_docs": ["x"], "split": "dev",'
            ' "relevant_chunks": [{"doc_id": "y", "text": "t"}]}',
            "not in relevant_docs",
        ),
    ],
)
def test_a_bad_line_is_refused_naming_file_and_line(tmp_path, line, message):
    p = tmp_path / "q.jsonl"
    p.write_text('{"id": "ok", "question": "fine?", "relevant_docs": ["x"], "split": "dev"}\n' + line + "\n")
    with pytest.raises(QuestionSetError, match=message) as e:
        load_questions(p)
    assert f"{p}:2" in str(e.value)


def test_duplicate_ids_and_missing_files_are_refused(tmp_path):
    p = tmp_path / "q.jsonl"
    line = '{"id": "a", "question": "q?", "relevant_docs": ["x"], "split": "dev"}\n'
    p.write_text(line + line)
    with pytest.raises(QuestionSetError, match="duplicate id 'a'"):
        load_questions(p)
    with pytest.raises(QuestionSetError, match="cannot read question set"):
        load_questions(tmp_path / "absent.jsonl")


# --- the runner, in process ---------------------------------------------------------------------


def test_chunk_labels_are_scored_by_passage(settings, docs_dir):
    write(
        docs_dir / "pets.md",
        "# Cats\n\nCats purr and sleep all day.\n\n# Dogs\n\nDogs bark at the postman.\n",
    )
    write(docs_dir / "cars.md", "# Engines\n\nA diesel engine compresses air until fuel ignites.\n")
    Indexer(settings).refresh(docs_dir)
    q = docs_dir.parent / "q.jsonl"
    q.write_text(
        json.dumps(
            {
                "id": "bark",
                "question": "which animal barks at the postman",
                "relevant_docs": ["pets.md"],
                "relevant_chunks": [{"doc_id": "pets.md", "text": "Dogs  bark\nat the postman"}],
                "split": "report",
            }
        )
        + "\n"
        + json.dumps(
            {"id": "diesel", "question": "diesel engine fuel", "relevant_docs": ["cars.md"], "split": "dev"}
        )
        + "\n"
    )
    rep = evaluate(settings, load_questions(q), k=2)
    assert rep.n == 2 and rep.n_chunk_labelled == 1 and rep.generation == 1
    bark = next(r for r in rep.results if r.id == "bark")
    assert bark.ranked_docs[0] == "pets.md" and bark.docs.recall == 1.0
    assert bark.chunks is not None and bark.chunks.recall == 1.0
    assert rep.chunks == bark.chunks
    assert len(set(bark.ranked_docs)) == len(bark.ranked_docs)
    assert evaluate(settings, load_questions(q), k=2, split="dev").n == 1
    exact = evaluate(settings, load_questions(q), k=2, exact=True)
    assert exact.exact and [r.ranked_docs for r in exact.results] == [r.ranked_docs for r in rep.results]
    with pytest.raises(EvalError, match="mode 'sparse' is not supported"):
        evaluate(settings, load_questions(q), mode="sparse")
    with pytest.raises(EvalError, match="generation 7 does not exist"):
        evaluate(settings, load_questions(q), generation=7)


def test_a_label_absent_from_the_index_is_reported(settings, docs_dir):
    write(docs_dir / "a.md", "# A\n\nalpha beta gamma\n")
    Indexer(settings).refresh(docs_dir)
    q = docs_dir.parent / "q.jsonl"
    q.write_text(
        json.dumps({"id": "x", "question": "alpha", "relevant_docs": ["gone.md"], "split": "dev"}) + "\n"
    )
    rep = evaluate(settings, load_questions(q), k=3)
    assert rep.missing == [("x", "gone.md")] and rep.docs.recall == 0.0


# --- the CLI, end to end ------------------------------------------------------------------------


@pytest.fixture
def cli(db_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env.update(RAG_HOME=str(tmp_path / "home"), RAG_DATABASE_URL=db_url, RAG_SHARDS="8")

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [sys.executable, "-m", "rag_assets.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        if ok:
            assert p.returncode == 0, p.stderr[-3000:]
        return p

    return run


def test_eval_cli_on_the_samples_index(cli):
    cli("index", str(SAMPLES), "--core")
    out = json.loads(cli("eval", str(SAMPLE_SET), "--split", "report", "--json").stdout)
    n_report = len(load_questions(SAMPLE_SET, "report"))
    assert out["n"] == n_report and out["k"] == 10 and out["mode"] == "hybrid" and out["split"] == "report"
    assert out["generation"] == 1 and out["missing_docs"] == [] and out["chunk_metrics"] is None
    assert set(out["metrics"]) == {"recall@10", "mrr@10", "ndcg@10"}
    assert all(0.0 <= v <= 1.0 for v in out["metrics"].values())
    # sane for the hashing embedder (measured 0.81 / 0.46 / 0.54): far above chance (10 of 53 docs)
    assert out["metrics"]["recall@10"] >= 0.6 and out["metrics"]["mrr@10"] >= 0.3
    assert len(out["results"]) == n_report
    r = out["results"][0]
    assert {"id", "split", "question", "relevant_docs", "ranked_docs", "hits", "metrics", "seconds"} <= set(r)
    assert len(r["ranked_docs"]) == len(set(r["ranked_docs"])) == 10

    exact = json.loads(cli("eval", str(SAMPLE_SET), "--split", "report", "--exact", "--json").stdout)
    assert exact["exact"] is True and out["exact"] is False and exact["n"] == n_report
    assert all(0.0 <= v <= 1.0 for v in exact["metrics"].values())

    table = cli("eval", str(SAMPLE_SET), "-k", "5").stdout
    assert "recall@5" in table and "mrr@5" in table and "ndcg@5" in table
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
    assert rows["n"] == [str(len(load_questions(SAMPLE_SET)))]
    assert all(0.0 <= float(rows[m][0]) <= 1.0 for m in ("recall@5", "mrr@5", "ndcg@5"))

    # a full rebuild makes generation 2 live; generation 1 (same content) is still evaluated on its own tables
    cli("index", str(SAMPLES), "--core", "--full")
    live = json.loads(cli("eval", str(SAMPLE_SET), "--json").stdout)
    old = json.loads(cli("eval", str(SAMPLE_SET), "--json", "--generation", "1").stdout)
    assert live["generation"] == 2 and old["generation"] == 1
    assert [x["ranked_docs"] for x in old["results"]] == [x["ranked_docs"] for x in live["results"]]

    bad = cli("eval", str(SAMPLE_SET), "--generation", "9", ok=False)
    assert bad.returncode == 2 and "generation 9 does not exist" in bad.stderr
    bad = cli("eval", str(SAMPLE_SET), "--mode", "sparse", ok=False)
    assert bad.returncode == 2 and "invalid choice: 'sparse'" in bad.stderr
