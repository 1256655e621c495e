"""The quality gate: a new generation whose recall@k dropped beyond the tolerance does not go live.

A model change (the hashing embedder at 256 dimensions → 8 dimensions, which cannot tell the
documents apart) builds a new generation; the gate measures both on the question set, refuses the
switch, keeps the old generation serving, records both figures, does not judge again on the same
inputs; a tolerance that allows the drop lets it switch.
"""

from __future__ import annotations

import json
from dataclasses import replace

from rag_assets.embedders import make_embedder
from rag_assets.pipeline import Indexer
from rag_assets.quality_gate import recorded_recall, refusal
from rag_assets.query import search
from rag_assets.store.db import connect_index
from rag_assets.store.serving import live_generation
from tests.helpers import write

TOPICS = {
    "volcano": "magma lava eruption crater basalt",
    "orchestra": "violin cello conductor symphony oboe",
    "glacier": "ice moraine crevasse snowfield fjord",
    "bakery": "sourdough oven crust flour yeast",
    "comet": "nucleus coma tail perihelion orbit",
    "harbor": "pier dock tugboat anchor quay",
}


def _refresh(settings):
    idx = Indexer(settings)
    try:
        return idx.refresh(settings.source_path)
    finally:
        idx.close()


def test_a_worse_generation_is_refused_and_the_old_one_keeps_serving(settings, tmp_path):
    for name, words in TOPICS.items():
        write(settings.source_path / f"{name}.md", f"# {name.title()}\n\n" + " ".join([words] * 20) + "\n")
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text(
        "".join(
            json.dumps({"id": n, "question": f"tell me about {w.split()[0]} and {w.split()[2]}", "relevant_docs": [f"{n}.md"], "split": "dev"}) + "\n"
            for n, w in TOPICS.items()
        )
    )
    # the gate measures the mode the index serves; vector mode, so that the model change shows
    good = replace(settings, quality_questions=str(qfile), quality_k=1, quality_tolerance=0.05, retrieval_mode="vector")
    rep = _refresh(good)
    assert rep.generation_switched
    with connect_index(good) as c:
        gen1 = live_generation(c).id
        assert recorded_recall(c, gen1) == 1.0  # the baseline, recorded when it went live

    worse = replace(good, embedding_dimensions=8)  # a "model change" that cannot separate the topics
    rep = _refresh(worse)
    assert not rep.generation_switched
    with connect_index(good) as c:
        assert live_generation(c).id == gen1  # the old generation keeps serving
        refused = refusal(c, gen1 + 1)
    assert refused is not None and refused["recall_live"] == 1.0 and refused["recall_new"] < 0.95
    assert "recall@1" in refused["reason"] and "tolerance 0.05" in refused["reason"]
    emb = make_embedder(good)
    try:
        with connect_index(good) as c:
            assert search(c, emb, "violin and conductor", k=1).results[0].doc_id == "orchestra.md"
    finally:
        emb.close()

    # the same inputs are not judged again; an allowed drop switches
    assert not _refresh(worse).generation_switched
    with connect_index(good) as c:
        assert refusal(c, gen1 + 1) == refused
    lenient = replace(worse, quality_tolerance=1.0)
    rep = _refresh(lenient)
    assert rep.generation_switched
    with connect_index(good) as c:
        assert live_generation(c).id == gen1 + 1 and refusal(c, gen1 + 1) is None


def test_without_a_question_set_switches_are_not_gated(settings):
    write(settings.source_path / "a.md", "# A\n\nalpha beta gamma")
    assert _refresh(settings).generation_switched
    assert _refresh(replace(settings, embedding_dimensions=8)).generation_switched


def test_plan_shows_what_a_model_or_chunker_switch_will_embed_and_cost(settings):
    """`rag-assets plan`: before any backfill, the texts and tokens a switch will embed, and the price."""
    from rag_assets.plan import plan_switch

    # no headings: the structure chunker then adds no heading-path header, so both chunkers make the same texts
    for name, words in TOPICS.items():
        write(settings.source_path / f"{name}.md", f"{words}\n")
    write(settings.source_path / "copy.md", f"{TOPICS['volcano']}\n")  # same text as volcano.md
    _refresh(settings)
    with connect_index(settings) as c:
        same = plan_switch(c, settings)
        assert not same.new_generation and same.texts_to_embed == 0 and same.tokens_to_embed == 0
        n_texts, n_tokens = c.execute("SELECT count(DISTINCT chunk_hash), sum(n_tokens) FILTER (WHERE doc_id <> 'copy.md') FROM chunks").fetchone()
        other = replace(settings, embedder="openai", embedding_model="text-embedding-3-small", embedding_dimensions=256)
        p = plan_switch(c, other)
        assert p.new_generation and not p.rechunk
        assert p.texts_to_embed == n_texts == len(TOPICS)  # the duplicate text is embedded once
        assert p.tokens_to_embed == n_tokens and p.price_known and p.cost_usd == round(n_tokens * p.price_per_mtok / 1e6, 6)
        rechunked = plan_switch(c, replace(settings, chunker="fixed"))
        # one-paragraph documents chunk to the same texts either way: a chunker switch re-chunks all,
        # and embeds nothing the cache already holds
        assert rechunked.rechunk and rechunked.new_generation and rechunked.chunks == 7
        assert (rechunked.texts_to_embed, rechunked.texts_cached) == (0, 6)


def test_eval_compare_runs_the_gate_by_hand(settings, tmp_path, capsys):
    """`rag-assets eval Q --compare`: the refused generation against the live one, both figures, nothing recorded."""
    from rag_assets import cli

    for name, words in TOPICS.items():
        write(settings.source_path / f"{name}.md", f"# {name.title()}\n\n" + " ".join([words] * 20) + "\n")
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        "".join(
            json.dumps({"id": n, "question": f"tell me about {w.split()[0]} and {w.split()[2]}", "relevant_docs": [f"{n}.md"], "split": "dev"}) + "\n"
            for n, w in TOPICS.items()
        )
    )
    base = replace(settings, retrieval_mode="vector", quality_questions=str(qfile), quality_k=1)
    _refresh(base)
    assert not _refresh(replace(base, embedding_dimensions=8)).generation_switched  # refused: it stays building
    env = {
        "RAG_DATABASE_URL": settings.database_url,
        "RAG_HOME": str(settings.home),
        "RAG_INDEX_NAME": settings.index_name,
        "RAG_PG_SCHEMA": settings.pg_schema,
        "RAG_SHARDS": str(settings.shards),
        "RAG_RETRIEVAL_MODE": "vector",
        "RAG_EMBEDDING_DIMENSIONS": "8",
    }
    import os

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        rc = cli.main(["eval", str(qfile), "-k", "1", "--compare", "--json"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    cap = capsys.readouterr()
    assert cap.out.strip(), cap.err
    out = json.loads(cap.out.strip().splitlines()[-1])
    assert rc == 0 and out["passed"] is False and out["recall_live"] == 1.0 and out["recall_new"] < 0.95
    with connect_index(settings) as c:
        assert live_generation(c).id == out["live_generation"]
