"""An index reads the source it was built from (invariant 7), on every path; no run silently
deletes most of it; the manifest stage decides under the shard lock. Each test failed before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import dagster as dg
import pytest

from rag_assets.defs.resources import resources_for
from rag_assets.defs.sensors import build_sensors
from rag_assets.failures import EXIT_SOURCE
from rag_assets.pipeline import (
    Indexer,
    MassDeleteRefused,
    StageContext,
    manifest_stage,
    plan_scan,
)
from rag_assets.store.serving import index_digest
from rag_assets.store.source_binding import SourceMismatch, load_binding
from tests.helpers import write


def _docs(root, n, prefix="d", text="body"):
    for i in range(n):
        write(root / f"{prefix}{i:02d}.md", f"# {prefix} {i}\n\n{text} {i} of {prefix}.", mtime_ns=10**18 + i)


@pytest.fixture
def two_folders(tmp_path):
    real, sample = tmp_path / "real", tmp_path / "samples"
    _docs(real, 12, "real")
    _docs(sample, 7, "sample")
    return real, sample


def test_refresh_without_a_path_reads_the_bound_folder_not_rag_source_path(settings, two_folders):
    """The service applier's and the Dagster assets' path: RAG_SOURCE_PATH points elsewhere."""
    real, sample = two_folders
    idx = Indexer(settings)
    idx.refresh(real)
    digest = index_digest(idx.conn)
    idx.close()
    elsewhere = Indexer(replace(settings, source_path=sample))  # e.g. `samples/corpus` in the cwd
    try:
        rep = elsewhere.refresh(progress=False)
        assert rep.docs_deleted == 0 and rep.docs_added == 0
        assert index_digest(elsewhere.conn) == digest
        assert load_binding(elsewhere.conn).root == str(real.resolve())
    finally:
        elsewhere.close()


def test_another_folder_or_other_globs_are_refused_unless_changed_on_purpose(settings, two_folders):
    real, sample = two_folders
    idx = Indexer(settings)
    try:
        idx.refresh(real)
        digest = index_digest(idx.conn)
        with pytest.raises(SourceMismatch, match=f"built from {real.resolve()}.*not {sample.resolve()}"):
            idx.refresh(sample)
        other_globs = Indexer(replace(settings, include=("**/*.rst",)), conn=idx.conn)
        with pytest.raises(SourceMismatch, match=r"--change-source"):
            other_globs.refresh(real)
        assert index_digest(idx.conn) == digest
        # On purpose: the new folder replaces every document, so the delete guard asks too.
        with pytest.raises(MassDeleteRefused, match="refusing to delete 12 of the 12 documents"):
            idx.refresh(sample, change_source=True)
        rep = idx.refresh(sample, change_source=True, allow_deletes=True)
        assert rep.docs_added == 7 and rep.docs_deleted == 12
        assert load_binding(idx.conn).root == str(sample.resolve())
    finally:
        idx.close()


def test_mass_delete_is_refused_with_counts_and_nothing_changes(settings, docs_dir):
    _docs(docs_dir, 20)
    idx = Indexer(settings)
    try:
        idx.refresh(docs_dir)
        digest = index_digest(idx.conn)
        for i in range(15):
            (docs_dir / f"d{i:02d}.md").unlink()
        with pytest.raises(MassDeleteRefused, match=r"refusing to delete 15 of the 20 documents of this index \(75% > "):
            idx.refresh(docs_dir)
        assert index_digest(idx.conn) == digest
        # a few deletions (within the share) go through as always
        write(docs_dir / "d00.md", "# back\n\nrestored")
        for i in range(1, 9):
            write(docs_dir / f"d{i:02d}.md", f"# back {i}\n\nrestored {i}")
        rep = idx.refresh(docs_dir)
        assert rep.docs_deleted == 6
        for f in docs_dir.glob("*.md"):
            f.unlink()
        rep = idx.refresh(docs_dir, allow_deletes=True)
        assert rep.docs_deleted == 14 and rep.docs_total == 0
    finally:
        idx.close()


def test_an_index_without_a_recorded_folder_does_no_folder_work(settings, two_folders):
    """Homes of the previous release have folder documents but no binding: no background path may
    guess a folder (that is how the sample corpus replaced real documents)."""
    real, sample = two_folders
    idx = Indexer(settings)
    idx.refresh(real)
    digest = index_digest(idx.conn)
    idx.conn.execute("DELETE FROM settings WHERE key = 'source'")
    idx.close()
    guess = Indexer(replace(settings, source_path=sample))
    try:
        guess.refresh(progress=False)
        assert index_digest(guess.conn) == digest
        assert load_binding(guess.conn) is None
    finally:
        guess.close()
    # A webhook-only index whose RAG_SOURCE_PATH does not exist (the service started from another
    # directory): a refresh runs and applies its events instead of failing forever.
    hooks_only = Indexer(replace(settings, database_url=_fresh_db(settings), source_path=real / "nope"))
    try:
        rep = hooks_only.refresh(progress=False)
        assert rep.docs_total == 0 and rep.errors == []
        assert load_binding(hooks_only.conn) is None
    finally:
        hooks_only.close()


def test_source_sensor_watches_the_bound_folder(settings, two_folders):
    real, sample = two_folders
    idx = Indexer(settings)
    idx.refresh(real)
    idx.close()
    moved = replace(settings, source_path=sample)
    sensor = next(s for s in build_sensors(moved) if s.name == f"{moved.index_name}_source_sensor")
    with dg.instance_for_test() as instance:
        res = sensor(dg.build_sensor_context(instance=instance, resources=resources_for(moved)))
    files = sum(ev.metadata["files"].value for ev in res.asset_events)
    assert files == 12  # the real folder's files, not the 7 sample ones


def test_manifest_stage_decides_under_the_lock_against_a_concurrent_writer(settings, docs_dir):
    """Plan without the lock, another writer changes the shard, then write: before, this failed with
    "content changed but no body was supplied" or wrote metadata={} into serving rows."""
    _docs(docs_dir, 6)
    idx = Indexer(settings)
    idx.refresh(docs_dir)
    ctx = StageContext.create(settings)
    try:
        write(docs_dir / "d00.md", "---\ntags: [new]\n---\n# d 0\n\nbody 0 of d.")  # metadata-only
        write(docs_dir / "d01.md", "# d 1\n\nnew content 1.")  # content change
        write(docs_dir / "d09.md", "# d 9\n\nadded later.")
        source = ctx.source()
        stale_plan = plan_scan(ctx.conn, source, settings.shards)
        write(docs_dir / "d02.md", "# d 2\n\nchanged after the plan.")
        idx.refresh(docs_dir)  # the other writer, in between plan and write
        write(docs_dir / "d03.md", "# d 3\n\nwritten by nobody yet.", mtime_ns=10**18 + 3)
        manifest_stage(ctx, range(settings.shards), stale_plan, source)
        meta = dict(ctx.conn.execute("SELECT doc_id, metadata FROM manifest").fetchall())
        assert all(m.get("path") == d for d, m in meta.items()), meta  # never metadata={}
        assert meta["d00.md"]["tags"] == ["new"]
        assert "d09.md" in meta
    finally:
        ctx.conn.close()
    idx.refresh(docs_dir)
    ref = Indexer(replace(settings, database_url=_fresh_db(settings)))
    try:
        ref.refresh(docs_dir)
        assert index_digest(idx.conn) == index_digest(ref.conn)
    finally:
        ref.close()
        idx.close()


def _fresh_db(settings) -> str:
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(settings.database_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}"))


@pytest.fixture
def cli(db_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env.update(RAG_HOME=str(tmp_path / "home"), RAG_DATABASE_URL=db_url, RAG_SHARDS="8")

    def run(*args: str, cwd=None, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "rag_assets.cli", *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
            cwd=cwd,
        )

    return run


@pytest.mark.slow
def test_cli_refuses_the_hostile_cases_with_one_line_and_exit_code(cli, two_folders, tmp_path):
    real, sample = two_folders
    assert cli("index", str(real)).returncode == 0
    status = json.loads(cli("status", "--json").stdout)
    for args, extra, cwd in [
        (("index", ""), {}, str(sample)),  # the current directory
        (("index", str(real)), {"RAG_INCLUDE": ",,,"}, None),
        (("index", str(sample)), {}, None),  # a mistyped path that exists
    ]:
        p = cli(*args, cwd=cwd, **extra)
        assert p.returncode in (EXIT_SOURCE, 2), (args, p.returncode, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0], p.stderr
    assert json.loads(cli("status", "--json").stdout)["index_digest"] == status["index_digest"]
    p = cli("index", str(sample))
    assert p.returncode == EXIT_SOURCE and "--change-source" in p.stderr
    p = cli("index", str(sample), "--change-source")
    assert p.returncode == EXIT_SOURCE and "--allow-deletes" in p.stderr
