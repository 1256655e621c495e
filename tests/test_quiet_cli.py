"""The quiet CLI: ``rag-assets index`` through Dagster prints a summary (and bars on a terminal), not
Dagster's event log, unless ``--verbose``; ``--json`` prints only JSON; the Dagster instance still
records every materialization and asset check. Real subprocesses, a real database, a real pty."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import pytest

from rag_assets.progress import StageBars, bars_wanted
from tests.helpers import write

DAGSTER_DEBUG = " - DEBUG - "  # the console logger's format: "<time> - dagster - DEBUG - <job> - ..."


@pytest.fixture
def env(db_url, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env.update(RAG_HOME=str(tmp_path / "home"), RAG_DATABASE_URL=db_url, RAG_SHARDS="8")
    return env


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "rag_assets.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _docs(root: Path) -> Path:
    for i in range(6):
        write(root / f"d{i}.md", f"# Doc {i}\n\nShard by shard, document {i} reaches the index.")
    return root


def _instance(env: dict) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(Path(env["RAG_HOME"]) / "dagster"))


def test_json_is_the_only_output_and_the_instance_keeps_every_event(env, tmp_path):
    docs = _docs(tmp_path / "docs")
    p = _cli(env, "index", str(docs), "--json")
    rep = json.loads(p.stdout)  # exactly one JSON document: json.loads refuses anything after it
    assert p.stdout.count("\n") == 1 and rep["docs_added"] == 6 and rep["shards_refreshed"] > 0
    assert p.stderr == ""  # no DEBUG event log, no BetaWarning, nothing

    instance = _instance(env)
    [run] = instance.get_runs()
    assert run.is_success and run.tags["rag/trigger"] == "cli"
    events = [e.dagster_event for e in instance.all_logs(run.run_id) if e.dagster_event]
    mats = [e for e in events if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION]
    by_stage: dict[str, set[str]] = {}
    for e in mats:
        by_stage.setdefault(e.asset_key.path[-1], set()).add(e.partition)
    shards = by_stage["embeddings"]
    assert len(shards) == rep["shards_refreshed"]
    assert {s: by_stage[s] for s in ("document_manifest", "chunks")} == {
        "document_manifest": shards,
        "chunks": shards,
    }
    emb = next(e for e in mats if e.asset_key.path[-1] == "embeddings")
    meta = emb.event_specific_data.materialization.metadata
    assert meta["chunks_embedded"].value == rep["chunks_embedded"] > 0
    # The UI reads the same records: the latest materialization per shard, and the asset checks.
    latest = instance.fetch_materializations(emb.asset_key, limit=100).records
    assert {r.partition_key for r in latest} == shards
    checks = [e for e in events if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
    assert checks and all(e.event_specific_data.passed for e in checks)
    types = {e.event_type for e in events}
    assert {
        dg.DagsterEventType.RUN_START,
        dg.DagsterEventType.STEP_SUCCESS,
        dg.DagsterEventType.RUN_SUCCESS,
    } <= types


def test_verbose_adds_dagster_event_log_and_plain_run_prints_one_summary_line(env, tmp_path):
    docs = _docs(tmp_path / "docs")
    plain = _cli(env, "index", str(docs))
    assert plain.stderr == "" and len(plain.stdout.splitlines()) == 1  # a pipe: no bars, one summary
    assert plain.stdout.startswith(f"indexed {docs}: 6 documents")

    write(docs / "d1.md", "# Doc 1\n\nEdited: one document changed.")
    loud = _cli(env, "--verbose", "index", str(docs), "--json")
    assert json.loads(loud.stdout)["docs_modified"] == 1  # stdout stays JSON even when verbose
    debug = [ln for ln in loud.stderr.splitlines() if DAGSTER_DEBUG in ln]
    assert any("ASSET_MATERIALIZATION" in ln for ln in debug) and any("RUN_SUCCESS" in ln for ln in debug)

    write(docs / "d2.md", "# Doc 2\n\nEdited as well.")
    after = _cli(env, "index", str(docs), "--verbose")  # the flag also works after the command
    assert DAGSTER_DEBUG in after.stderr and after.stdout.startswith("indexed ")
    assert len(_instance(env).get_runs()) == 3


def _on_a_terminal(env: dict, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the CLI with its stderr on a pty (a person's terminal); return it and what the terminal got."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the slave side closed: the child exited
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "rag_assets.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=300,
        )
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert p.returncode == 0
    return p, b"".join(chunks).decode(errors="replace")


def test_terminal_gets_a_bar_per_stage_then_the_summary(env, tmp_path):
    docs = _docs(tmp_path / "docs")
    p, terminal = _on_a_terminal(env, "index", str(docs))
    for label in (
        "documents scanned",
        "manifest shards",
        "chunked shards",
        "chunks embedded",
        "shards synced",
    ):
        assert label in terminal, terminal
    assert "6/6" in terminal and DAGSTER_DEBUG not in terminal
    assert p.stdout.count("\n") == 1 and p.stdout.startswith("indexed ")

    write(docs / "d3.md", "# Doc 3\n\nEdited on a terminal.")
    p, terminal = _on_a_terminal(env, "index", str(docs), "--core", "--json")
    assert terminal == "" and json.loads(p.stdout)["docs_modified"] == 1  # --json: no bars, even here


def test_bars_only_for_a_terminal_and_never_with_json():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert bars_wanted(Tty(), as_json=False)
    assert not bars_wanted(Tty(), as_json=True)
    assert not bars_wanted(io.StringIO(), as_json=False)
    off = io.StringIO()
    bars = StageBars(enabled=False, stream=off)
    bars.start("scan", 3)
    bars.advance("scan", 3)
    bars.close()
    assert off.getvalue() == ""
    out = Tty()
    bars = StageBars(enabled=True, stream=out)
    bars.start("embeddings", 4)
    bars.advance("embeddings", 4)
    bars.advance("embedded", 17)  # a bar with no known total starts on first use
    bars.close()
    assert "shards synced" in out.getvalue() and "4/4" in out.getvalue() and "17chunk" in out.getvalue()


def test_a_failed_dagster_run_ends_with_one_line_naming_its_cause(env, tmp_path):
    docs = _docs(tmp_path / "docs")
    env = dict(  # an embedding endpoint that refuses connections: the embeddings step fails
        env,
        RAG_EMBEDDER="openai",
        RAG_EMBEDDING_MODEL="text-embedding-3-small",
        RAG_EMBEDDING_API_KEY="sk-test",
        RAG_EMBEDDING_BASE_URL="http://127.0.0.1:9/v1",
        RAG_EMBEDDING_MAX_RETRY_S="0.5",
    )
    p = subprocess.run(
        [sys.executable, "-m", "rag_assets.cli", "index", str(docs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 5 and p.stdout == ""  # 5: an embedding failure (rag_assets/failures.py)
    *before, line = p.stderr.splitlines()  # it ends with one line naming the cause
    assert line.startswith("rag-assets index: error: refresh of shards") and "in embeddings" in line
    assert "Connection refused" in line and "127.0.0.1:9" in line
    # Before it only the embedder's own retry warnings (why the run paused), no Dagster event log
    # and no traceback.
    assert before and all("connection error" in ln and "; retry " in ln for ln in before), p.stderr
