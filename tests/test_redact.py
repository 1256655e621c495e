"""No database password reaches a message, in any connection-string form (issue 16, item 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

import pytest

from rag_assets.redact import UNPARSEABLE, redact_url, scrub

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://rag:{SECRET}@db.internal:5432/rag",
        f"postgresql://rag:{SECRET}@db.internal:5432/rag?sslmode=require&password={SECRET}",
        f"host=db.internal port=5432 dbname=rag user=rag password={SECRET}",
        f"host=db.internal password='{SECRET}' dbname=rag",
        f"postgresql://rag:{SECRET}@[::1:bad/rag",  # malformed IPv6
        f"postgresql://rag:{SECRET}@db:notaport/rag",
        f"host=db password={SECRET} dbname",  # malformed key=value
    ],
)
def test_redact_and_scrub_never_keep_the_password(url):
    assert SECRET not in (redact_url(url) or "")
    assert SECRET not in scrub(f"could not connect using {url}: failed", url)


def test_redacted_forms_keep_what_helps():
    assert redact_url(f"postgresql://rag:{SECRET}@db:5432/rag") == "postgresql://rag:***@db:5432/rag"
    assert "host=db" in redact_url(f"host=db password={SECRET}")
    assert redact_url("postgresql://u:p@[::1:bad/x") == UNPARSEABLE


def _server(db_url: str) -> tuple[str, str, str]:
    parts = urlsplit(db_url)
    return parse_qs(parts.query)["host"][0], parts.path.lstrip("/"), parts.username or "postgres"


@pytest.mark.parametrize("form", ["keywords", "malformed", "unreachable"])
def test_cli_messages_and_status_hide_the_password(db_url, tmp_path, form):
    host, db, user = _server(db_url)
    url = {
        "keywords": f"host={host} dbname={db} user={user} password={SECRET}",  # trust auth: connects
        "malformed": f"postgresql://{user}:{SECRET}@[::1:bad/{db}",
        "unreachable": f"host=127.0.0.1 port=1 dbname={db} user={user} password={SECRET} connect_timeout=2",
    }[form]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env.update(RAG_HOME=str(tmp_path / "home"), RAG_DATABASE_URL=url, RAG_SHARDS="4")
    p = subprocess.run(
        [sys.executable, "-m", "rag_assets.cli", "status", "--json"], env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert SECRET not in p.stdout + p.stderr
    assert (p.returncode == 0) == (form == "keywords"), p.stderr
    if form != "keywords":
        assert p.returncode == 4 and len(p.stderr.strip().splitlines()) == 1
