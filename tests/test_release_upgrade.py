"""An index built by the previous release keeps working after the upgrade to several indexes per database.

The previous release (``PREVIOUS``: one index, schema ``rag`` holding its own embedding cache, Dagster
names without prefixes) is extracted from this repository's history and run as a user ran it
(README command 1's ``rag-assets index``, through Dagster). Then this release opens the same home:
the cache moves to ``rag_cache`` (or merges into one that another index already made), nothing cached is
lost (only the texts of this release's new chunker version are embedded), answers are the same documents
and the Dagster history is still the default index's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import dagster as dg
import pytest

from rag_assets.defs.runner import index_via_dagster
from rag_assets.embedders import make_embedder
from rag_assets.query import search
from rag_assets.settings import Settings
from rag_assets.store.db import connect_index
from tests.helpers import write

REPO = Path(__file__).resolve().parent.parent
PREVIOUS = "dbfecbbfc707c39f59ad2554db85a874424e9601"  # stop 17 (2026-12-02): the last release with one index per database
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("previous")
    archive = out / "src.tar"
    r = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), PREVIOUS, "rag_assets"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"the previous release is part of this repository's history: {r.stderr}"
    with tarfile.open(archive) as t:
        t.extractall(out, filter="data")
    return out


def _old(release: Path, home: Path, db_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env.update(PYTHONPATH=str(release), RAG_HOME=str(home), RAG_DATABASE_URL=db_url, RAG_SHARDS="8")
    r = subprocess.run(
        [sys.executable, "-m", "rag_assets.cli", *args], env=env, cwd=release, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _docs(folder: Path) -> None:
    for i in range(6):
        write(folder / f"d{i}.md", f"# Topic {i}\n\nParagraph {i} about shards, vectors and snapshot number {i}.\n")


def _check_upgraded(settings: Settings, before: list[str]) -> None:
    """``before``: the doc ids the previous release answered with, in order."""
    rep = index_via_dagster(settings, settings.source_path)
    # This release's chunker is a new version (structure-v3: each chunk's text starts with its heading
    # path, docs/architecture.md Decision 32), so the upgrade re-chunks into a new generation: exactly the
    # six new texts (one chunk per document) are embedded; the vectors the cache moved are all kept.
    assert rep.docs_unchanged == 6 and rep.chunks_embedded == 6 and rep.generation_switched
    again = index_via_dagster(settings, settings.source_path)
    assert again.chunks_embedded == 0 and again.shards_refreshed == 0
    emb = make_embedder(settings)
    try:
        with connect_index(settings) as c:
            hits = search(c, emb, "vectors and snapshot number 3", k=5).results
            assert [h.doc_id for h in hits] == before
            assert all(h.text.startswith(f"Topic {h.doc_id[1]}\n\n# Topic") for h in hits)
            assert c.execute("SELECT to_regclass('rag.embedders'), to_regclass('rag.embedding_cache')").fetchone() == (None, None)
            n = c.execute("SELECT count(*) FROM rag_cache.embedding_cache").fetchone()[0]
            assert n >= 12
    finally:
        emb.close()


def test_a_home_built_by_the_previous_release_is_adopted(previous_release, db_url, tmp_path):
    docs, home = tmp_path / "docs", tmp_path / "home"
    _docs(docs)
    _old(previous_release, home, db_url, "index", str(docs))
    before = [h["doc_id"] for h in json.loads(_old(previous_release, home, db_url, "query", "vectors and snapshot number 3", "--json").stdout)["results"]]
    settings = Settings.from_env({}, home=home, database_url=db_url, shards=8, source_path=docs)
    _check_upgraded(settings, before)
    # the Dagster history of the old runs belongs to the same (unprefixed) assets
    from rag_assets.dagster_instance import instance as dagster_instance

    inst = dagster_instance(settings)
    assert inst.get_latest_materialization_event(dg.AssetKey("embeddings")) is not None


def test_the_previous_release_merges_into_a_cache_another_index_made(previous_release, db_url, tmp_path):
    other = Settings.from_env({}, index_name="other", pg_schema="kb_other", home=tmp_path / "home", database_url=db_url, shards=4, source_path=tmp_path / "o")
    write(other.source_path / "x.md", "# X\n\nAn unrelated document of the other index.\n")
    assert index_via_dagster(other, other.source_path).chunks_embedded == 1  # makes rag_cache first
    docs, home = tmp_path / "docs", tmp_path / "home"
    _docs(docs)
    _old(previous_release, home, db_url, "index", str(docs), "--core")
    before = [h["doc_id"] for h in json.loads(_old(previous_release, home, db_url, "query", "vectors and snapshot number 3", "--json").stdout)["results"]]
    settings = Settings.from_env({}, home=home, database_url=db_url, shards=8, source_path=docs)
    _check_upgraded(settings, before)
    with connect_index(settings) as c:
        fk = c.execute(
            "SELECT confrelid = 'rag_cache.embedders'::regclass FROM pg_constraint "
            "WHERE conrelid = 'rag.generations'::regclass AND contype = 'f'"
        ).fetchall()
        assert fk == [(True,)]  # the generations point at the shared cache's embedders
    assert index_via_dagster(other, other.source_path).chunks_embedded == 0  # the other index is untouched
