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
    good = replace(settings, quality_questions=str(qfile), quality_k=1, quality_tolerance=0.05)
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
