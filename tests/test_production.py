"""The production shape, run for real: `dagster-webserver`, `dagster-daemon run` and the code server
over gRPC (`dagster code-server start`), with Dagster's storage in PostgreSQL through deploy/dagster.yaml
(a fresh database on the session's server) and the webserver/daemon loading deploy/workspace.grpc.yaml.

1. A full backfill over GraphQL, then an incremental change (edit + delete + add) that the sensors and
   the automation refresh on their own; the index digest equals a fresh full build (`rag-assets index
   --core` into another fresh database) after each step.
2. Four concurrent range runs (four backfills over disjoint shard ranges) embedding through an
   OpenAI-compatible server with latency: no deadlock, no lost update (digest equals a full build), and
   the `embedder` pool (limit 2 in deploy/dagster.yaml) caps the embedding steps running at once.

Every process runs in its own session and is stopped by the fixture's finalizer, even on failure.

Known bug found by (2), reported, not in a file this test owns: every new step process runs
`rag_assets.store.schema.migrate` (all DDL, in one transaction) on its first connection; under concurrent
runs a `CREATE INDEX IF NOT EXISTS` there can deadlock with another run's writes
(psycopg.errors.DeadlockDetected in `migrate`). Until migrate skips the DDL when the schema is current,
a run failing with exactly that error marks the test xfail; any other failure fails it.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from rag_assets.manifest import shard_key, shard_of
from rag_assets.settings import Settings
from tests.e2e_utils import (
    Dagster,
    ProcessSet,
    base_env,
    cli,
    edit_marker,
    free_port,
    pg_env,
    query_hits,
    run_partitions,
    session_pids,
    start_production,
    wait_backfills,
    wait_for,
    write_corpus,
)
from tests.fake_openai import FakeOpenAI

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
N_SHARDS = 8
INTERVAL_S = 2
POOL_LIMIT = 2  # deploy/dagster.yaml: concurrency.pools.default_limit


class Deployment:
    """webserver + daemon + gRPC code server on Postgres storage, in a temp folder."""

    def __init__(self, tmp_path: Path, make_db, rag_env: dict[str, str]):
        self.tmp = tmp_path
        self.make_db = make_db
        self.home = tmp_path / "dagster_home"
        self.home.mkdir()
        shutil.copy(DEPLOY / "dagster.yaml", self.home / "dagster.yaml")
        self.dagster_db = make_db()
        self.rag_db = make_db()
        self.grpc_port = free_port()
        self.port = free_port()
        self.env = base_env(
            DAGSTER_HOME=str(self.home),
            DAGSTER_CODE_SERVER_HOST="127.0.0.1",
            DAGSTER_CODE_SERVER_PORT=str(self.grpc_port),
            RAG_DATABASE_URL=self.rag_db,
            RAG_HOME=str(tmp_path / "rag_home"),
            RAG_SHARDS=str(N_SHARDS),
            RAG_SOURCE_SENSOR_INTERVAL_S=str(INTERVAL_S),
            RAG_INBOX_SENSOR_INTERVAL_S=str(INTERVAL_S),
            RAG_AUTOMATION_INTERVAL_S=str(INTERVAL_S),
            **pg_env(self.dagster_db),
            **rag_env,
        )
        self.settings = Settings.from_env(self.env)
        self.procs = ProcessSet(tmp_path / "logs")
        self.api = Dagster(self.port)
        self._instance = None

    def start(self) -> None:
        self.api = start_production(self.procs, self.env, self.grpc_port, self.port)

    @property
    def instance(self):
        """The same Postgres-backed instance, opened in this process (for step-level events). libpq
        reads PGHOST at each connect, so the variables stay set until :meth:`stop`."""
        if self._instance is None:
            import dagster as dg

            keys = ["PGHOST", *(k for k in self.env if k.startswith("DAGSTER_"))]
            self._saved_env = {k: os.environ.get(k) for k in keys}
            os.environ.update({k: self.env[k] for k in keys if k in self.env})
            self._instance = dg.DagsterInstance.from_config(str(self.home))
        return self._instance

    def stop(self) -> list[str]:
        if self._instance is not None:
            self._instance.dispose()
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return self.procs.stop_all()

    def known_migrate_deadlock(self) -> bool:
        """A step died in rag_assets.store.schema.migrate with a PostgreSQL deadlock (reported; see
        the module docstring of this test): every new step process re-runs the schema DDL in one
        transaction, and a CREATE INDEX IF NOT EXISTS there can deadlock with another run's writes."""
        log = self.procs.procs[0].log_path.read_text(errors="replace") if self.procs.procs else ""
        return "DeadlockDetected" in log and "in migrate" in log

    def wait_backfills(self, ids: list[str], shards: set[str], timeout: float) -> list[dict]:
        """All runs of the backfills once every shard is materialized (retried runs are waited for)."""
        return wait_backfills(self.api, ids, shards, timeout, check=self.procs.check_alive)

    def reference_digest(self, docs: Path) -> str:
        """A fresh full build of ``docs`` into a new database, through the CLI; its digest."""
        env = dict(
            self.env, RAG_DATABASE_URL=self.make_db(), RAG_HOME=str(self.tmp / f"ref_{uuid.uuid4().hex[:6]}")
        )
        cli(["index", str(docs), "--core", "--json"], env)
        return cli(["status", "--json"], env)["index_digest"]

    def digest(self) -> str:
        return cli(["status", "--json"], self.env)["index_digest"]


@pytest.fixture
def deployment(tmp_path, make_db, request):
    """Factory: build and start a Deployment; every one is stopped at teardown, pass or fail."""
    made: list[Deployment] = []
    failed_before = request.session.testsfailed

    def make(rag_env: dict[str, str]) -> Deployment:
        d = Deployment(tmp_path, make_db, rag_env)
        made.append(d)
        d.start()
        return d

    yield make
    for d in made:
        notes = d.stop()
        print(f"\nstop: {notes or 'SIGINT sufficed'}")
        if request.session.testsfailed > failed_before:
            print(d.procs.logs())
        assert not [pid for p in d.procs.procs for pid in session_pids(p.pid)], "processes left behind"


def test_backfill_then_incremental_change_equals_a_full_build(deployment, tmp_path):
    docs = tmp_path / "docs"
    ids = write_corpus(docs, 30, seed=21)
    t0 = time.monotonic()
    d = deployment({"RAG_SOURCE_PATH": str(docs), "RAG_EMBEDDING_DIMENSIONS": "64"})
    started_s = time.monotonic() - t0

    bid = d.api.launch_backfill()
    d.wait_backfills([bid], {shard_key(i) for i in range(N_SHARDS)}, timeout=180)
    backfill_s = time.monotonic() - t0 - started_s
    assert d.digest() == d.reference_digest(docs)

    d.api.wait_quiet(quiet_s=3 * INTERVAL_S + 2, timeout=90, check=d.procs.check_alive)
    before = {r["runId"] for r in d.api.runs()}
    edited, deleted = ids[3], ids[7]
    token = "zp" + uuid.uuid4().hex[:12]
    query = edit_marker(docs / edited, token)
    (docs / deleted).unlink()
    added = "added/new-doc.md"
    (docs / "added").mkdir()
    add_token = "za" + uuid.uuid4().hex[:12]
    add_query = edit_marker(docs / added, add_token)
    affected = {shard_key(shard_of(x, N_SHARDS)) for x in (edited, deleted, added)}
    t_change = time.monotonic()

    def refreshed():
        from rag_assets.store.db import connect

        ok_edit = any(h["doc_id"] == edited and token in h["text"] for h in query_hits(d.settings, query, 3))
        ok_add = any(
            h["doc_id"] == added and add_token in h["text"] for h in query_hits(d.settings, add_query, 3)
        )
        conn = connect(d.rag_db)
        try:
            gone = (
                conn.execute("SELECT count(*) FROM items WHERE doc_id = %s", (deleted,)).fetchone()[0]
                == 0
            )
        finally:
            conn.close()
        return ok_edit and ok_add and gone

    wait_for(refreshed, 150, "the incremental change to be served", interval=0.5, check=d.procs.check_alive)
    refresh_s = time.monotonic() - t_change
    d.api.wait_quiet(quiet_s=3 * INTERVAL_S + 2, timeout=90, check=d.procs.check_alive)
    new = [r for r in d.api.runs() if r["runId"] not in before]
    assert new and all(r["status"] == "SUCCESS" for r in new), new
    touched = {p for r in new for p in run_partitions(r)}
    assert affected <= touched, (affected, touched)
    # automation range runs may span the gap between two affected shards, never beyond them
    lo, hi = min(affected), max(affected)
    assert all(lo <= p <= hi for p in touched), (touched, affected)
    assert d.digest() == d.reference_digest(docs)
    print(
        f"\nprocesses up {started_s:.1f} s, backfill {backfill_s:.1f} s, change served in {refresh_s:.1f} s, "
        f"runs for the change: {[run_partitions(r) for r in new]}"
    )


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    cur = best = 0
    for _, step in events:
        cur += step
        best = max(best, cur)
    return best


def test_concurrent_range_runs_share_the_embedder_pool(deployment, tmp_path):
    from dagster._core.events import DagsterEventType

    docs = tmp_path / "docs"
    write_corpus(docs, 24, seed=22)
    with FakeOpenAI(dims=16, latency_s=1.5) as fake:
        rag_env = {
            "RAG_SOURCE_PATH": str(docs),
            "RAG_EMBEDDER": "openai",
            "RAG_EMBEDDING_BASE_URL": fake.url,
            "RAG_EMBEDDING_API_KEY": "sk-test",
            "RAG_EMBEDDING_MODEL": "fake-model",
            "RAG_EMBEDDING_DIMENSIONS": "16",
            "RAG_EMBEDDING_CONCURRENCY": "1",
        }
        d = deployment(rag_env)
        # Create the pool's slots once, before runs race to create them: with four runs starting at
        # once, Dagster's lazy initialisation of a pool from `default_limit` can raise UniqueViolation
        # on concurrency_limits in one of them (seen in benchmarks/backfill_scale.py). Deployments do
        # the same once: `dagster instance concurrency set embedder 2`.
        d.instance.event_log_storage.initialize_concurrency_limit_to_default("embedder")
        ranges = [[shard_key(i), shard_key(i + 1)] for i in range(0, N_SHARDS, 2)]
        t0 = time.monotonic()
        ids = [d.api.launch_backfill(partitions=r) for r in ranges]
        all_runs = d.wait_backfills(ids, {shard_key(i) for i in range(N_SHARDS)}, timeout=300)
        wall = time.monotonic() - t0
        runs = [r for r in all_runs if r["status"] == "SUCCESS"]
        retried = [r for r in all_runs if r["status"] == "FAILURE"]
        assert sorted(run_partitions(r) for r in runs) == ranges  # one (successful) range run per backfill

        instance = d.instance
        run_spans, emb_spans = [], []
        for r in runs:
            rec = instance.get_run_record_by_id(r["runId"])
            run_spans.append((rec.start_time, rec.end_time))
            logs = instance.all_logs(
                r["runId"], of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}
            )
            t = {e.dagster_event.event_type: e.timestamp for e in logs if e.step_key == "embeddings"}
            emb_spans.append((t[DagsterEventType.STEP_START], t[DagsterEventType.STEP_SUCCESS]))
        runs_at_once, emb_at_once = _max_overlap(run_spans), _max_overlap(emb_spans)
        info = instance.event_log_storage.get_concurrency_info("embedder")
        print(
            f"\n4 range runs in {wall:.1f} s: runs at once {runs_at_once}, embedding steps at once {emb_at_once}, "
            f"embedding requests in flight at most {fake.max_in_flight}, pool slots {info.slot_count}"
        )
        assert info.slot_count == POOL_LIMIT
        assert runs_at_once >= 2, run_spans  # the ranges really ran in parallel
        assert emb_at_once <= POOL_LIMIT, emb_spans  # ... but never more embedding steps than the pool allows
        assert fake.max_in_flight <= POOL_LIMIT  # RAG_EMBEDDING_CONCURRENCY=1 per step
        assert d.digest() == d.reference_digest(docs)  # no lost or duplicated rows
        if retried:
            assert d.known_migrate_deadlock(), f"runs failed (and were retried) for another reason: {retried}"
            pytest.xfail(
                f"known bug: {len(retried)} run(s) hit DeadlockDetected in rag_assets.store.schema.migrate; "
                "run retries recovered and the index equals a full build"
            )
