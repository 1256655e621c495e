"""Concurrent first runs on a fresh home (embedded server, Dagster instance, schema, extension, shard
setting and source binding all created at once) all succeed: before, some died with a raw
UniqueViolation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import write

pytestmark = pytest.mark.slow


def test_three_first_runs_at_once_on_a_fresh_home(tmp_path):
    docs = tmp_path / "docs"
    for i in range(10):
        write(docs / f"d{i}.md", f"# Doc {i}\n\nText of document {i}.")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env.update(RAG_HOME=str(home), RAG_SHARDS="4")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rag_assets.cli", "index", str(docs), "--json", *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra in ((), (), ("--core",))
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-3000:]
        st = subprocess.run(
            [sys.executable, "-m", "rag_assets.cli", "status", "--json"], env=env, capture_output=True, text=True,
            timeout=120,
        )
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["documents"] == 10
        again = json.loads(
            subprocess.run(
                [sys.executable, "-m", "rag_assets.cli", "index", str(docs), "--json"], env=env,
                capture_output=True, text=True, timeout=120,
            ).stdout
        )
        assert again["docs_total"] == 10 and again["chunks_embedded"] == 0
    finally:
        subprocess.run([sys.executable, "-m", "rag_assets.cli", "db", "stop"], env=env, timeout=60)
