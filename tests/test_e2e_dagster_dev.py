"""End to end under a real `dagster dev`: backfill over GraphQL, then one file edit refreshed by the
sensors, declarative automation and the daemon alone — only that file's shard re-runs.

Everything runs on the project's embedded defaults (RAG_DATABASE_URL unset): a temporary RAG_HOME
holds the embedded PostgreSQL and the generated DAGSTER_HOME (Dagster's storage in that server's
``dagster`` database), exactly as a user's first `dagster dev` would, with short sensor intervals.
`dagster dev` runs in its own session and is stopped with SIGINT → SIGTERM → SIGKILL on the group;
the test fails if any of its processes outlive that.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

from rag_assets.dagster_instance import dagster_home
from rag_assets.manifest import shard_key, shard_of
from rag_assets.settings import Settings
from rag_assets.store.embedded import ensure_runtime_dir, stop_embedded
from tests.e2e_utils import (
    Dagster,
    ProcessSet,
    base_env,
    dagster_dev_argv,
    edit_marker,
    free_port,
    query_hits,
    run_partitions,
    session_pids,
    wait_backfills,
    wait_queryable,
    write_corpus,
)

pytestmark = pytest.mark.slow

N_SHARDS = 8
INTERVAL_S = 2


@pytest.fixture
def dev(tmp_path):
    """A running `dagster dev` on the embedded defaults; stopped (and checked stopped) at teardown."""
    ensure_runtime_dir()
    docs = tmp_path / "docs"
    ids = write_corpus(docs, 24, seed=3)
    env = base_env(
        RAG_HOME=str(tmp_path / "home"),
        RAG_SOURCE_PATH=str(docs),
        RAG_SHARDS=str(N_SHARDS),
        RAG_SOURCE_SENSOR_INTERVAL_S=str(INTERVAL_S),
        RAG_INBOX_SENSOR_INTERVAL_S=str(INTERVAL_S),
        RAG_AUTOMATION_INTERVAL_S=str(INTERVAL_S),
        XDG_RUNTIME_DIR=os.environ["XDG_RUNTIME_DIR"],
    )
    settings = Settings.from_env(env)
    env["DAGSTER_HOME"] = str(dagster_home(settings))  # starts the embedded server, writes dagster.yaml
    port = free_port()
    procs = ProcessSet(tmp_path / "logs")
    try:
        proc = procs.start(
            "dagster-dev",
            dagster_dev_argv(port),
            env,
        )
        yield {
            "settings": settings,
            "docs": docs,
            "ids": ids,
            "api": Dagster(port),
            "procs": procs,
            "proc": proc,
        }
    finally:
        notes = procs.stop_all()
        stop_embedded(settings.home)
        print("stop:", notes or "SIGINT sufficed")
    assert not [pid for p in procs.procs for pid in session_pids(p.pid)], "processes left behind"


def test_backfill_then_one_edit_refreshes_only_its_shard(dev):
    api: Dagster = dev["api"]
    procs: ProcessSet = dev["procs"]
    settings: Settings = dev["settings"]
    t_start = time.monotonic()
    load_s = api.wait_loaded(timeout=120, check=procs.check_alive)

    # 1. bootstrap: a backfill of every shard, launched over GraphQL (once the automation's own reaction
    #    to the source sensor's first report has finished: overlapping runs hit a known deadlock)
    api.settle_after_start(quiet_s=12, timeout=150, check=procs.check_alive)
    t_backfill = time.monotonic()
    backfill_id = api.launch_backfill()
    all_shards = {shard_key(i) for i in range(N_SHARDS)}

    wait_backfills(api, [backfill_id], all_shards, timeout=150, check=procs.check_alive)
    backfill_s = time.monotonic() - t_backfill
    probe = query_hits(settings, "freshness marker shard", 3)
    assert probe, "the backfill built no queryable index"

    # let the automation settle (it may also react to the source sensor's first report)
    api.wait_quiet(quiet_s=3 * INTERVAL_S + 2, timeout=90, check=procs.check_alive)
    before = {r["runId"] for r in api.runs()}

    # 2. edit ONE file; touch nothing else
    doc_id = dev["ids"][5]
    shard = shard_key(shard_of(doc_id, N_SHARDS))
    token = "zq" + uuid.uuid4().hex[:12]
    query = edit_marker(dev["docs"] / doc_id, token)
    seconds = wait_queryable(settings, query, doc_id, token, timeout=120, check=procs.check_alive)
    print(f"\nedit -> queryable: {seconds:.1f} s (load {load_s:.1f} s, backfill {backfill_s:.1f} s)")

    # 3. the runs since the edit were launched by the automation sensor and touched only that shard
    api.wait_quiet(quiet_s=3 * INTERVAL_S + 2, timeout=90, check=procs.check_alive)
    new = [r for r in api.runs() if r["runId"] not in before]
    assert new, "no run was launched for the edit"
    for r in new:
        assert r["tags"].get("dagster/sensor_name") == "rag_automation", r["tags"]
        assert run_partitions(r) == [shard], (run_partitions(r), shard)
        assert r["status"] == "SUCCESS", r
    hits = query_hits(settings, query, 1)
    assert hits[0]["doc_id"] == doc_id and token in hits[0]["text"]
    assert time.monotonic() - t_start < 300
