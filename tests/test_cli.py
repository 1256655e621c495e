"""The CLI contract, run as real subprocesses against a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.helpers import write

INDEX_KEYS = {
    "docs_total",
    "docs_added",
    "docs_modified",
    "docs_metadata_only",
    "docs_deleted",
    "docs_unchanged",
    "chunks_total",
    "chunks_embedded",
    "tokens_embedded",
    "chunks_reused",
    "shards_refreshed",
    "seconds",
    "errors",
    "cost_usd",
    "cost_avoided_usd",
    "generation",
    "rows_written",
    "rows_deleted",
}


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
        )
        if ok:
            assert p.returncode == 0, p.stderr[-3000:]
        return p

    return run


def test_index_query_status_export_roundtrip(cli, tmp_path):
    docs = tmp_path / "docs"
    write(
        docs / "guide.md", "---\ntags: [ops]\n---\n# Deploying\n\nRoll out the vector index shard by shard."
    )
    write(docs / "api.rst", "API\n===\n\nThe query endpoint returns the top chunks.")
    write(docs / "bad.md", b"\x00\x01binary")
    rep = json.loads(cli("index", str(docs), "--json").stdout)
    assert INDEX_KEYS <= set(rep)
    assert (
        rep["docs_added"] == 2
        and rep["docs_total"] == 2
        and rep["chunks_embedded"] == rep["chunks_total"] > 0
    )
    assert rep["errors"] == [{"doc_id": "bad.md", "error": "binary file (contains NUL bytes); skipped"}]
    again = json.loads(cli("index", str(docs), "--json").stdout)
    assert again["chunks_embedded"] == 0 and again["shards_refreshed"] == 0 and again["docs_unchanged"] == 2

    q = json.loads(cli("query", "roll out vector shard", "-k", "2", "--json").stdout)
    assert q["results"][0]["doc_id"] == "guide.md" and q["generation"] == rep["generation"]
    assert {"doc_id", "seq", "text", "score", "metadata"} <= set(q["results"][0])
    f = json.loads(cli("query", "query endpoint", "--filter", "tags=ops", "--json").stdout)
    assert [r["doc_id"] for r in f["results"]] == ["guide.md"]

    st = json.loads(cli("status", "--json").stdout)
    assert (
        st["documents"] == 2 and st["serving_rows"] == rep["chunks_total"] and len(st["index_digest"]) == 64
    )
    assert st["shards_behind"] == 0

    cli("export", str(tmp_path / "rows.parquet"))
    t = pq.read_table(tmp_path / "rows.parquet")
    assert t.num_rows == rep["chunks_total"] and set(t.column_names) >= {
        "doc_id",
        "seq",
        "text",
        "metadata",
        "embedding",
    }
    cli("export", str(tmp_path / "rows.jsonl"), "--format", "jsonl")
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(lines) == rep["chunks_total"] and json.loads(lines[0])["embedding"]

    cost = json.loads(cli("cost", "--price-per-mtok", "0.02", "--json").stdout)
    assert cost["total"]["tokens_embedded"] == rep["tokens_embedded"]


def test_failures_exit_nonzero_and_name_the_culprit(cli, tmp_path):
    p = cli("index", str(tmp_path / "missing"), ok=False)
    assert p.returncode != 0 and "missing" in p.stderr and "does not exist" in p.stderr
    p = cli("query", "anything", ok=False)
    assert p.returncode != 0 and "index is empty" in p.stderr
    p = cli("query", "x", "--filter", "novalue", ok=False)
    assert p.returncode != 0 and "KEY=VALUE" in p.stderr


def test_bad_setting_names_the_variable(db_url, tmp_path):
    env = dict(os.environ, RAG_HOME=str(tmp_path), RAG_DATABASE_URL=db_url, RAG_SHARDS="500")
    p = subprocess.run(
        [sys.executable, "-m", "rag_assets.cli", "status"], env=env, capture_output=True, text=True
    )
    assert p.returncode != 0 and "RAG_SHARDS" in p.stderr
