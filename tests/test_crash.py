"""Invariant 4, crash safety, with real processes: SIGKILL a refresh in the middle of embedding and in
the middle of a shard sync. Afterwards every shard is at its old or its new state (per-shard digest of
the serving rows), there are no duplicate rows, and the next run converges to a full rebuild.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import psycopg
import pytest

from rag_assets.pipeline import Indexer
from rag_assets.settings import Settings
from rag_assets.store.db import connect_index
from rag_assets.store.serving import index_digest, shard_digests
from tests.conftest import TEST_INDEX, TEST_SCHEMA
from tests.fake_openai import FakeOpenAI
from tests.helpers import markdown_doc, write

pytestmark = pytest.mark.slow


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    env.update(
        RAG_HOME=str(settings.home),
        RAG_DATABASE_URL=settings.database_url,
        RAG_INDEX_NAME=settings.index_name,
        RAG_PG_SCHEMA=settings.pg_schema,
        RAG_SHARDS=str(settings.shards),
        RAG_EMBEDDING_DIMENSIONS=str(settings.embedding_dimensions or 32),
        DAGSTER_HOME=str(settings.home / "dagster"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    (settings.home / "dagster").mkdir(parents=True, exist_ok=True)
    (settings.home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return env


def _start_index(settings: Settings, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rag_assets.cli", "index", str(settings.source_path), "--json", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill(p: subprocess.Popen) -> None:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


def _corpus(root, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(n):
        write(root / f"d{i:04d}.md", markdown_doc(rng), mtime_ns=10**18 + seed * 10**6 + i)


def _reference(settings: Settings, db: str, embedder=None) -> dict[int, str]:
    idx = Indexer(replace(settings, database_url=db), embedder=embedder)
    idx.refresh(settings.source_path, full=True)
    d = shard_digests(idx.conn)
    idx.close()
    return d


def _assert_each_shard_old_or_new(
    conn, old: dict[int, str], new: dict[int, str], shards: int
) -> tuple[int, int]:
    now = shard_digests(conn)
    n_old = n_new = 0
    for s in range(shards):
        got = now.get(s)
        assert got in (old.get(s), new.get(s)), f"shard {s} is neither at its old nor its new state"
        n_old += got == old.get(s) and old.get(s) != new.get(s)
        n_new += got == new.get(s) and old.get(s) != new.get(s)
    dup = conn.execute("SELECT count(*) - count(DISTINCT (doc_id, seq)) FROM items").fetchone()[0]
    assert dup == 0
    return n_old, n_new


def _settings(db_url, tmp_path, **kw) -> Settings:
    return Settings.from_env(
        {},
        index_name=TEST_INDEX,
        pg_schema=TEST_SCHEMA,
        home=tmp_path / "home",
        database_url=db_url,
        shards=8,
        source_path=tmp_path / "docs",
        embedding_dimensions=32,
        **kw,
    )


def test_sigkill_during_embedding_then_converge(db_url, make_db, tmp_path):
    with FakeOpenAI(dims=32, latency_s=0.25) as srv:
        settings = _settings(
            db_url,
            tmp_path,
            embedder="openai",
            embedding_base_url=srv.url,
            embedding_api_key="sk-test",
            embedding_model="fake-model",
            embedding_batch_size=8,
            embedding_concurrency=1,
        )
        env = _env(
            settings,
            RAG_EMBEDDER="openai",
            RAG_EMBEDDING_BASE_URL=srv.url,
            RAG_EMBEDDING_API_KEY="sk-test",
            RAG_EMBEDDING_MODEL="fake-model",
            RAG_EMBEDDING_BATCH_SIZE="8",
            RAG_EMBEDDING_CONCURRENCY="1",
        )
        _corpus(settings.source_path, 40, seed=1)
        p = _start_index(settings, env)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        conn = connect_index(settings)
        old = shard_digests(conn)
        _corpus(settings.source_path, 60, seed=2)  # edits 40 docs and adds 20: every shard changes

        from rag_assets.embedders.openai_compat import OpenAICompatEmbedder

        def emb():
            return OpenAICompatEmbedder(srv.url, "sk-test", "fake-model", batch_size=8)

        new = _reference(settings, make_db(), emb())
        srv.reset_counters()
        p = _start_index(settings, env)
        deadline = time.time() + 120
        while srv.request_count < 4 and time.time() < deadline and p.poll() is None:
            time.sleep(0.02)
        assert p.poll() is None, "the refresh finished before it could be killed"
        _kill(p)  # mid-embedding: a batch in flight, some committed to the cache
        served_before_kill = set(srv.served_counts())
        _assert_each_shard_old_or_new(conn, old, new, settings.shards)
        cached = conn.execute("SELECT count(*) FROM rag_cache.embedding_cache").fetchone()[0]
        assert cached > 0
        srv.reset_counters()
        p = _start_index(settings, env)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        assert shard_digests(conn) == new
        # vectors paid for before the kill were committed to the cache and not paid for again: only
        # the last uncommitted group (batch size x concurrency x 2 = 16 texts) can be sent twice
        resent = set(srv.served_counts()) & served_before_kill
        assert served_before_kill and len(resent) <= 16


@pytest.mark.parametrize("marker", ["WITH ins AS", "COPY chunks"])
def test_sigkill_during_shard_sync_then_converge(db_url, make_db, tmp_path, marker):
    settings = _settings(db_url, tmp_path)
    env = _env(settings)
    seeds = {"A": 3, "B": 4}
    sizes = {"A": 300, "B": 1500}
    digests = {}
    for name in ("B", "A"):  # reference digests of both corpora, built from scratch
        _write_state(settings, name, seeds, sizes)
        digests[name] = _reference(settings, make_db())
    p = _start_index(settings, env, "--core")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    conn = connect_index(settings)
    assert shard_digests(conn) == digests["A"]
    watcher = psycopg.connect(settings.database_url, autocommit=True)
    current, killed = "A", False
    for _attempt in range(4):
        target = "B" if current == "A" else "A"
        _write_state(settings, target, seeds, sizes)
        p = _start_index(settings, env, "--core")
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline:
            if watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s AND pid <> pg_backend_pid()",
                (f"%{marker}%",),
            ).fetchone():
                _kill(p)
                killed = True
                break
        if killed:
            break
        p.wait(timeout=60)  # finished before we caught the statement: try again the other way round
        current = target
    assert killed, f"never caught a backend running {marker!r}"
    time.sleep(0.5)  # the server notices the dead client and rolls its transaction back
    n_old, n_new = _assert_each_shard_old_or_new(conn, digests[current], digests[target], settings.shards)
    p = _start_index(settings, env, "--core")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    assert shard_digests(conn) == digests[target]
    ref = Indexer(replace(settings, database_url=make_db()))
    ref.refresh(settings.source_path, full=True)
    assert index_digest(conn) == index_digest(ref.conn)


def _write_state(settings: Settings, name: str, seeds: dict, sizes: dict) -> None:
    _corpus(settings.source_path, sizes[name], seeds[name])
    for f in settings.source_path.glob("d*.md"):
        if int(f.stem[1:]) >= sizes[name]:
            f.unlink()


@pytest.mark.parametrize("scenario", ["first-index", "full-rebuild"])
def test_sigkill_during_hnsw_build_is_finished_by_the_default_path(db_url, make_db, tmp_path, scenario):
    """Killed between the last shard sync and the switch (during the new generation's HNSW build),
    the next plain `rag-assets index` (the Dagster path) finishes the generation: it serves, and
    equals a full rebuild. Before, it exited 0 with generation null (first index) or left the
    rebuild building forever."""
    settings = _settings(db_url, tmp_path, hnsw_ef_construction=1000)  # a slower build to catch
    env = _env(settings, RAG_HNSW_EF_CONSTRUCTION="1000")
    _corpus(settings.source_path, 1500, seed=5)
    ref = _reference(settings, make_db())
    args: tuple[str, ...] = ()
    if scenario == "full-rebuild":
        p = _start_index(settings, env, "--core")
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        args = ("--full",)
    watcher = psycopg.connect(settings.database_url, autocommit=True)
    p = _start_index(settings, env, *args)
    killed = False
    deadline = time.time() + 240
    while p.poll() is None and time.time() < deadline:
        if watcher.execute(
            "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%USING hnsw (embedding%' "
            "AND pid <> pg_backend_pid()"
        ).fetchone():
            _kill(p)
            killed = True
            break
    assert killed, "the HNSW build finished before it could be killed"
    time.sleep(0.5)
    conn = connect_index(settings)
    building = conn.execute("SELECT count(*) FROM generations WHERE state = 'building'").fetchone()[0]
    assert building == 1
    p = _start_index(settings, env)  # the default path, no --core, no --full
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    import json

    rep = json.loads(out)
    assert rep["generation"] is not None and rep["generation_switched"] is True
    assert shard_digests(conn) == ref
    assert conn.execute("SELECT count(*) FROM generations WHERE state = 'building'").fetchone()[0] == 0
    hits = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    assert hits > 0


@pytest.mark.parametrize("stage", ["copy", "delta-sync", "hnsw-build"])
def test_sigkill_during_a_rebuild_refresh_keeps_the_old_generation_serving(db_url, make_db, tmp_path, stage):
    """Issue 15: a refresh on the rebuild path (copy of the live rows, delta sync into the new
    tables, one HNSW build, switch) killed at any of its steps leaves the old generation serving,
    unchanged; a killed copy leaves no generation behind (one transaction), a later kill a building
    generation that the next plain run (the Dagster path) finishes: it then equals a full rebuild."""
    from rag_assets.store.rebuild import COPY_MARK
    from rag_assets.store.serving import live_generation

    marker = {"copy": COPY_MARK, "delta-sync": "WITH ins AS", "hnsw-build": "USING hnsw (embedding"}[stage]
    slow_build = {"hnsw_ef_construction": 1000} if stage == "hnsw-build" else {}
    settings = _settings(db_url, tmp_path, **slow_build)
    env = _env(settings, RAG_SYNC_STRATEGY="rebuild", **({"RAG_HNSW_EF_CONSTRUCTION": "1000"} if slow_build else {}))
    _corpus(settings.source_path, 1200, seed=8)
    p = _start_index(settings, env, "--core")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    conn = connect_index(settings)
    old, g_old = shard_digests(conn), live_generation(conn).id
    _corpus(settings.source_path, 1200, seed=9)  # every document edited
    new = _reference(settings, make_db())
    watcher = psycopg.connect(settings.database_url, autocommit=True)
    p = _start_index(settings, env, "--core")
    killed = False
    deadline = time.time() + 240
    while p.poll() is None and time.time() < deadline:
        if watcher.execute(
            "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{marker}%",),
        ).fetchone():
            _kill(p)
            killed = True
            break
    assert killed, f"the refresh finished before its {stage} could be killed"
    time.sleep(0.5)
    # readers are still served by the old generation, as it was
    assert live_generation(conn).id == g_old
    assert shard_digests(conn) == old
    assert conn.execute("SELECT count(*) FROM items").fetchone()[0] > 0
    if stage == "copy":  # not committed: no generation row can be seen, the next run starts afresh
        assert conn.execute("SELECT count(*) FROM generations WHERE id > %s", (g_old,)).fetchone()[0] == 0
    else:
        building = conn.execute("SELECT count(*) FROM generations WHERE state = 'building'").fetchone()[0]
        assert building == 1
    p = _start_index(settings, env)  # the default (Dagster) path resumes the rebuild, or decides anew
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    assert shard_digests(conn) == new
    assert conn.execute("SELECT count(*) FROM generations WHERE state = 'building'").fetchone()[0] == 0
    assert live_generation(conn).id != g_old  # a rebuilt generation went live
    if stage == "copy":  # nothing to resume: the Dagster path chose the rebuild itself
        import json

        assert json.loads(out)["sync_strategy"] == "rebuild"
