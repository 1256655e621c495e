"""Listing cost of a no-change refresh of an S3 source: requests and seconds, measured up to 20k keys
in one moto bucket and extrapolated to 100k.

A moto S3 server runs in a child process (HTTP on 127.0.0.1; it counts the requests it receives), so
this process's CPU time is exactly the client side: botocore parsing the listing pages plus our
comparison. For each bucket size N, unversioned (ListObjectsV2) and versioned (ListObjectVersions),
the index's manifest is filled as a first index leaves it (one row per key with the object's size,
LastModified, ETag and version id in its metadata), then the source step of a no-change refresh runs
exactly as ``Indexer.refresh`` runs it (``plan_scan`` + ``check_deletes`` on a fresh source: the
versioning check, the listing, the stored change tokens, the comparison). Reported per N: requests
by operation (GetObject must be 0), wall seconds, client CPU seconds.

Why not 100k keys directly: moto's listing is quadratic. Every ListObjectsV2 page filters and sorts
the whole bucket, and every ListObjectVersions page deep-copies every version of every key (at 20k
versioned keys one process grew past 9 GB). So requests at 100k are extrapolated (they are
deterministic: one GetBucketVersioning and one page per 1,000 keys; checked at every measured N),
the client CPU per page is extrapolated from the measured sizes, and the comparison itself is
measured at 100k directly, with the listing replayed from memory. Moto's wall seconds say nothing
about S3 (whose pages take tens of milliseconds each whatever the bucket size): with S3's page
latency L, a no-change refresh of 100k keys waits about 100 x L.

Usage:
  python benchmarks/s3_listing.py                              # 1k..20k measured, 100k extrapolated
  python benchmarks/s3_listing.py --sizes 1000,5000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_assets.manifest import shard_of  # noqa: E402
from rag_assets.pipeline import check_deletes, plan_scan  # noqa: E402
from rag_assets.settings import Settings  # noqa: E402
from rag_assets.sources import FileStat, ScanResult  # noqa: E402
from rag_assets.sources.s3 import S3Source  # noqa: E402
from rag_assets.store.db import connect_index  # noqa: E402

PAGE = 1000  # keys per listing page (S3's maximum, the default of both listing calls)


# --- the server (child process) ------------------------------------------------------------------


class RequestLog:
    """WSGI middleware in front of moto: S3 operations counted as they arrive, plus control
    endpoints under ``/__rag/`` for the benchmark (counts, reset, fill)."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.ops: Counter[str] = Counter()

    @staticmethod
    def operation(environ) -> str:
        method = environ["REQUEST_METHOD"]
        parts = environ.get("PATH_INFO", "/").lstrip("/").split("/", 1)
        q = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if method == "GET" and len(parts) == 2 and parts[1]:
            return "GetObject"
        if method == "GET" and "versioning" in q:
            return "GetBucketVersioning"
        if method == "GET" and "versions" in q:
            return "ListObjectVersions"
        if method == "GET" and q.get("list-type") == ["2"]:
            return "ListObjectsV2"
        return f"{method} other"

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/__rag/"):
            return self.control(path[7:], parse_qs(environ.get("QUERY_STRING", "")), start_response)
        with self.lock:
            self.ops[self.operation(environ)] += 1
        return self.app(environ, start_response)

    def control(self, what: str, q: dict, start_response):
        if what == "counts":
            with self.lock:
                out = dict(self.ops)
        elif what == "reset":
            with self.lock:
                self.ops.clear()
            out = {}
        elif what == "fill":  # setup only: objects put into the backend directly (~20k/s)
            from moto.core.models import DEFAULT_ACCOUNT_ID
            from moto.s3.models import s3_backends

            backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
            bucket, n = q["bucket"][0], int(q["n"][0])
            t0 = time.perf_counter()
            for i in range(n):
                backend.put_object(
                    bucket, f"kb/d{i // 1000:03d}/doc{i:06d}.md", f"# Doc {i}\n\nBody of document {i}.\n".encode()
                )
            out = {"seconds": time.perf_counter() - t0}
        else:
            out = {"error": what}
        data = json.dumps(out).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


def serve() -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    server._server.app = RequestLog(server._server.app)
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()


# --- the client (this process) --------------------------------------------------------------------


class Control:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def __call__(self, what: str, **q) -> dict:
        qs = "&".join(f"{k}={v}" for k, v in q.items())
        with urllib.request.urlopen(f"{self.endpoint}/__rag/{what}?{qs}", timeout=3600) as r:
            return json.loads(r.read())


def fill_manifest(settings: Settings, stats: dict[str, FileStat], versioned: bool) -> None:
    """The manifest a first index leaves: one row per listed key with its change token."""
    conn = connect_index(settings)
    try:
        with conn.transaction(), conn.cursor() as cur, cur.copy(
            "COPY manifest (doc_id, shard, source, content_hash, meta_hash, size, mtime_ns, metadata)"
            " FROM STDIN (FORMAT BINARY)"
        ) as cp:
            cp.set_types(["text", "int2", "text", "text", "text", "int8", "int8", "jsonb"])
            for doc_id, st in stats.items():
                etag, _, version = (st.token or "").partition("@")
                meta = {"path": doc_id, "etag": etag, "version_id": version if versioned else None}
                cp.write_row(
                    (doc_id, shard_of(doc_id, settings.shards), "folder", "c" * 16, "m" * 16,
                     st.size, st.mtime_ns, Jsonb(meta))
                )
        conn.execute("ANALYZE manifest")
    finally:
        conn.close()


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def no_change_refresh(settings: Settings, uri: str) -> tuple:
    """The source step of a no-change refresh, as ``Indexer.refresh`` runs it."""
    conn = connect_index(settings)
    try:
        source = S3Source(uri, include=["**/*.md"], get_concurrency=settings.s3_get_concurrency)
        plan = plan_scan(conn, source, settings.shards)
        check_deletes(plan, source, settings.max_delete_fraction, allow=False)
        return plan
    finally:
        conn.close()


def bench_size(settings: Settings, client, control: Control, n: int, versioned: bool, runs: int) -> dict:
    bucket = f"rag-list-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    if versioned:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    fill_s = control("fill", bucket=bucket, n=n)["seconds"]
    uri = f"s3://{bucket}/kb"
    first = S3Source(uri, include=["**/*.md"])
    fill_manifest(settings, first.scan().stats, versioned)
    results = []
    for _ in range(runs):
        control("reset")
        scan, list_wall, list_cpu = _timed(lambda: S3Source(uri, include=["**/*.md"]).scan())
        control("reset")
        plan, wall, cpu = _timed(lambda: no_change_refresh(settings, uri))
        ops = control("counts")
        assert len(scan.stats) == n and not plan.reread and not plan.deleted, "not a no-change refresh"
        results.append(
            {"listing_wall_s": round(list_wall, 3), "listing_client_cpu_s": round(list_cpu, 3),
             "refresh_wall_s": round(wall, 3), "refresh_client_cpu_s": round(cpu, 3), "requests": ops}
        )
    best = min(results, key=lambda r: r["refresh_wall_s"])
    expected = {"GetBucketVersioning": 1, ("ListObjectVersions" if versioned else "ListObjectsV2"): -(-n // PAGE)}
    return {
        "keys": n,
        "versioned": versioned,
        "fill_s": round(fill_s, 2),
        "runs": results,
        "best": best,
        "requests_total": sum(best["requests"].values()),
        "get_object": best["requests"].get("GetObject", 0),
        "requests_as_predicted": best["requests"] == expected,
    }


class ReplayedListing(S3Source):
    """An S3 source whose listing is replayed from memory: the comparison step alone, at any size."""

    def __init__(self, uri: str, stats: dict[str, FileStat], versioned: bool):
        super().__init__(uri, include=["**/*.md"])
        self._versioned = versioned
        self._stats = stats

    def scan(self) -> ScanResult:
        return ScanResult(dict(self._stats), [])


def bench_compare(settings: Settings, n: int, versioned: bool) -> dict:
    """plan_scan's own work at ``n`` keys (stored tokens from Postgres + the comparison), no S3."""
    stats = {
        f"d{i // 1000:03d}/doc{i:06d}.md": FileStat(
            40, 1_700_000_000 * 10**9, f"{uuid.uuid4().hex}@{uuid.uuid4().hex}" if versioned else uuid.uuid4().hex
        )
        for i in range(n)
    }
    fill_manifest(settings, stats, versioned)
    conn = connect_index(settings)
    try:
        times = []
        for _ in range(3):
            src = ReplayedListing("s3://replayed-bucket/kb", stats, versioned)
            plan, wall, _cpu = _timed(lambda src=src: plan_scan(conn, src, settings.shards))
            assert not plan.reread and not plan.deleted
            times.append(wall)
    finally:
        conn.close()
    return {"keys": n, "versioned": versioned, "compare_s": round(min(times), 3)}


def extrapolate(measured: list[dict], compare: dict, n: int) -> dict:
    """Requests at ``n`` keys (deterministic) and the client's CPU per listing page (from the largest
    measured size), plus the measured comparison at ``n``."""
    big = max(measured, key=lambda r: r["keys"])
    pages = -(-big["keys"] // PAGE)
    per_page = max(0.0, big["best"]["listing_client_cpu_s"]) / pages
    n_pages = -(-n // PAGE)
    return {
        "keys": n,
        "versioned": big["versioned"],
        "requests": 1 + n_pages,
        "get_object": 0,
        "client_cpu_per_page_s": round(per_page, 4),
        "client_listing_cpu_s": round(per_page * n_pages, 2),
        "compare_s": compare["compare_s"],
        "from": f"client CPU per page at {big['keys']} keys; comparison measured at {n} (replayed listing)",
    }


def print_table(result: dict) -> None:
    print("\nNo-change refresh of an S3 source: the source step (plan_scan + check_deletes), best of runs")
    print(f"{'bucket':<12} {'keys':>7} {'requests':>9} {'GetObject':>9} {'as predicted':>12} "
          f"{'wall s (moto)':>13} {'client CPU s':>12}")
    for r in result["measured"]:
        b = r["best"]
        kind = "versioned" if r["versioned"] else "unversioned"
        print(f"{kind:<12} {r['keys']:>7} {r['requests_total']:>9} {r['get_object']:>9} "
              f"{str(r['requests_as_predicted']):>12} {b['refresh_wall_s']:>13.2f} {b['refresh_client_cpu_s']:>12.2f}")
    for e in result["extrapolated"]:
        kind = "versioned" if e["versioned"] else "unversioned"
        print(f"{kind:<12} {e['keys']:>7} {e['requests']:>9} {e['get_object']:>9} {'(extrapol.)':>12} "
              f"{'-':>13} {e['client_listing_cpu_s'] + e['compare_s']:>12.2f}")
    print("wall s (moto): dominated by moto's quadratic listing, not representative of S3; client CPU s: botocore")
    print("parsing the pages + our comparison. 100k rows: requests exact, client CPU = measured per page x pages")
    print("+ the comparison measured at 100k against a replayed listing:")
    for c in result["compare_at_target"]:
        print(f"  comparison at {c['keys']} keys ({'versioned' if c['versioned'] else 'unversioned'}): {c['compare_s']:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="1000,5000,10000,20000", help="unversioned bucket sizes measured")
    ap.add_argument("--versioned-sizes", default="1000,2000,5000", help="versioned bucket sizes measured")
    ap.add_argument("--target", type=int, default=100_000, help="the size extrapolated to")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--database-url", default=None, help="a server URL (default: a temporary embedded server)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    if args.serve:
        serve()
        return
    import boto3

    child = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    endpoint = child.stdout.readline().strip()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    work = Path(tempfile.mkdtemp(prefix="rag-s3-listing-"))
    server_url = args.database_url
    if server_url is None:
        from rag_assets.store.embedded import embedded_url

        server_url = embedded_url(work / "server")  # stopped at the end (it outlives processes by design)

    def fresh_settings() -> Settings:
        from urllib.parse import urlsplit, urlunsplit

        name = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        db = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
        return Settings.from_env({}, home=work / "home", database_url=db, shards=64)

    client = boto3.client("s3")
    control = Control(endpoint)
    result: dict = {"target": args.target, "measured": [], "extrapolated": [], "compare_at_target": []}
    try:
        plan = [(False, int(n)) for n in args.sizes.split(",") if n] + [
            (True, int(n)) for n in args.versioned_sizes.split(",") if n
        ]
        for versioned, n in plan:
            result["measured"].append(bench_size(fresh_settings(), client, control, n, versioned, args.runs))
            print(json.dumps(result["measured"][-1]), file=sys.stderr, flush=True)
        for versioned in sorted({v for v, _ in plan}):
            compare = bench_compare(fresh_settings(), args.target, versioned)
            result["compare_at_target"].append(compare)
            measured = [r for r in result["measured"] if r["versioned"] == versioned]
            result["extrapolated"].append(extrapolate(measured, compare, args.target))
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        if args.database_url is None:
            from rag_assets.store.embedded import stop_embedded

            stop_embedded(work / "server")
    print_table(result)
    print(json.dumps(result, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
