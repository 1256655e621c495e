"""The quiet CLI: ``rag-assets index`` prints a summary (and bars on a terminal), never Dagster's event
log (only ``--dagster-run --verbose`` does); ``--json`` prints only JSON; the Dagster instance still
records every materialization and asset check: as runless events written by a detached recorder
(default; ``rag-assets record`` waits for it), or as in-process runs (``--dagster-run``). Real
subprocesses, a real database, a real pty."""

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


def _materialized_shards(instance: dg.DagsterInstance, events=None) -> dict[str, set[str]]:
    if events is None:
        events = [
            r.event_log_entry.dagster_event
            for stage in ("raw_documents", "document_manifest", "chunks", "embeddings")
            for r in instance.fetch_materializations(dg.AssetKey(stage), limit=1000).records
        ]
    by_stage: dict[str, set[str]] = {}
    for e in events:
        if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            by_stage.setdefault(e.asset_key.path[-1], set()).add(e.partition)
    return by_stage


def test_json_is_the_only_output_and_the_instance_gets_every_event_without_a_run(env, tmp_path):
    docs = _docs(tmp_path / "docs")
    p = _cli(env, "index", str(docs), "--json")
    rep = json.loads(p.stdout)  # exactly one JSON document: json.loads refuses anything after it
    assert p.stdout.count("\n") == 1 and rep["docs_added"] == 6 and rep["shards_refreshed"] > 0
    assert p.stderr == ""  # no DEBUG event log, no BetaWarning, nothing
    waited = _cli(env, "record", "--json")  # waits for the detached recorder, then drains what is left
    assert json.loads(waited.stdout)["recorded"] in (0, 1)

    instance = _instance(env)
    assert instance.get_runs() == []  # runless: the core did the work, Dagster only records it
    by_stage = _materialized_shards(instance)
    shards = by_stage["embeddings"]
    assert len(shards) == rep["shards_refreshed"]
    assert {s: by_stage[s] for s in ("raw_documents", "document_manifest", "chunks")} == {
        "raw_documents": shards,
        "document_manifest": shards,
        "chunks": shards,
    }
    key = dg.AssetKey("embeddings")
    latest = instance.fetch_materializations(key, limit=100).records
    meta = latest[0].asset_materialization.metadata
    assert meta["chunks_embedded"].value == rep["chunks_embedded"] > 0
    status = instance.get_status_by_partition(
        key, partition_keys=sorted(shards), partitions_def=dg.StaticPartitionsDefinition(sorted(shards))
    )
    assert {p: s.value for p, s in status.items()} == {p: "MATERIALIZED" for p in shards}
    for name in ("rows_match_chunks", "no_orphan_rows", "vectors_valid", "quality_gate"):
        [check] = instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(key, name), limit=5)
        assert check.event.dagster_event.event_specific_data.passed, name

    write(docs / "d4.md", "# Doc 4\n\nEdited: one shard to record.")
    again = json.loads(_cli(env, "index", str(docs), "--json").stdout)
    _cli(env, "record")
    assert again["docs_modified"] == 1
    newest = instance.fetch_materializations(key, limit=1).records[0]
    assert newest.asset_materialization.metadata["docs_modified"].value == 1
    assert len(instance.fetch_materializations(key, limit=100).records) == len(shards) + 1


def test_dagster_run_keeps_the_run_page(env, tmp_path):
    docs = _docs(tmp_path / "docs")
    p = _cli(env, "index", str(docs), "--dagster-run", "--json")
    rep = json.loads(p.stdout)
    assert p.stderr == "" and rep["docs_added"] == 6
    [run] = _instance(env).get_runs()
    assert run.is_success and run.tags["rag/trigger"] == "cli"
    events = [e.dagster_event for e in _instance(env).all_logs(run.run_id) if e.dagster_event]
    by_stage = _materialized_shards(_instance(env), events)
    assert by_stage["embeddings"] == by_stage["chunks"] == by_stage["document_manifest"]
    checks = [e for e in events if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
    assert checks and all(e.event_specific_data.passed for e in checks)
    types = {e.event_type for e in events}
    assert {
        dg.DagsterEventType.RUN_START,
        dg.DagsterEventType.STEP_SUCCESS,
        dg.DagsterEventType.RUN_SUCCESS,
    } <= types


def test_verbose_waits_for_the_record_and_dagster_run_verbose_adds_the_event_log(env, tmp_path):
    docs = _docs(tmp_path / "docs")
    plain = _cli(env, "index", str(docs))
    assert plain.stderr == "" and len(plain.stdout.splitlines()) == 1  # a pipe: no bars, one summary
    assert plain.stdout.startswith(f"indexed {docs}: 6 documents")

    write(docs / "d1.md", "# Doc 1\n\nEdited: one document changed.")
    waited = _cli(env, "--verbose", "index", str(docs), "--json")
    assert json.loads(waited.stdout)["docs_modified"] == 1 and DAGSTER_DEBUG not in waited.stderr
    # --verbose waited for the record: it is in the instance when the command returns.
    newest = _instance(env).fetch_materializations(dg.AssetKey("chunks"), limit=1).records[0]
    assert newest.asset_materialization.metadata["docs_rechunked"].value == 1

    write(docs / "d2.md", "# Doc 2\n\nEdited as well.")
    loud = _cli(env, "index", str(docs), "--dagster-run", "--verbose", "--json")
    assert json.loads(loud.stdout)["docs_modified"] == 1  # stdout stays JSON even when verbose
    debug = [ln for ln in loud.stderr.splitlines() if DAGSTER_DEBUG in ln]
    assert any("ASSET_MATERIALIZATION" in ln for ln in debug) and any("RUN_SUCCESS" in ln for ln in debug)
    assert len(_instance(env).get_runs()) == 1


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
    p, terminal = _on_a_terminal(env, "index", str(docs), "--dagster-run")
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

    write(docs / "d5.md", "# Doc 5\n\nEdited on a terminal, default path.")
    p, terminal = _on_a_terminal(env, "index", str(docs))
    assert DAGSTER_DEBUG not in terminal and "Warning" not in terminal  # the core's output, as --core
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


@pytest.mark.parametrize("path", ["default", "--dagster-run"])
def test_a_failed_refresh_ends_with_one_line_naming_its_cause(env, tmp_path, path):
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
        [sys.executable, "-m", "rag_assets.cli", "index", str(docs), *([path] if path != "default" else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 5 and p.stdout == ""  # 5: an embedding failure (rag_assets/failures.py)
    *before, line = p.stderr.splitlines()  # it ends with one line naming the cause
    if path == "default":
        assert line.startswith("rag-assets index: error: refresh failed")
    else:
        assert line.startswith("rag-assets index: error: refresh of shards") and "in embeddings" in line
    assert "Connection refused" in line and "127.0.0.1:9" in line
    # Before it only the embedder's own retry warnings (why the run paused), no Dagster event log
    # and no traceback.
    assert before and all("connection error" in ln and "; retry " in ln for ln in before), p.stderr


def test_an_edit_through_the_default_path_never_imports_dagster_in_the_cli_process(env, tmp_path):
    """The CLI process of `rag-assets index` imports no Dagster module (~2.5 s of CPU): the detached
    recorder does, after the command has returned. A no-change refresh does not load the tokenizer."""
    docs = _docs(tmp_path / "docs")
    _cli(env, "index", str(docs), "--core")
    probe = (
        "import json, sys\n"
        "from rag_assets.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print(json.dumps({'rc': rc, 'dagster': sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster')),"
        " 'tiktoken': 'tiktoken' in sys.modules}))\n"
    )

    def probe_run(*args: str) -> dict:
        p = subprocess.run(
            [sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.splitlines()[-1])

    unchanged = probe_run("index", str(docs), "--json")
    assert unchanged == {"rc": 0, "dagster": [], "tiktoken": False}
    write(docs / "d2.md", "# Doc 2\n\nEdited: the recorder imports Dagster, not the CLI.")
    edited = probe_run("index", str(docs), "--json")
    assert edited["rc"] == 0 and edited["dagster"] == [] and edited["tiktoken"]  # chunking counted tokens
    _cli(env, "record")
    newest = _instance(env).fetch_materializations(dg.AssetKey("document_manifest"), limit=1).records[0]
    assert newest.asset_materialization.metadata["docs_modified"].value == 1
