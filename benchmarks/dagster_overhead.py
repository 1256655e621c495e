"""What Dagster costs on top of the core: per-run overhead, and proof that it adds no embedding work.

Two environments on the embedded defaults (each its own RAG_HOME, embedded PostgreSQL, and for the
Dagster path the generated Dagster instance in that PostgreSQL), fed the same folders:

* core:    ``Indexer.refresh`` in process (``rag-assets index --core``);
* dagster: ``index_via_dagster``, the path of plain ``rag-assets index``: stale shards found as the
  sensors find them, then in-process ``materialize`` range runs recorded in the Dagster instance.

Steps, each through both paths:

1. Django docs 5.0 full index, then the 5.0 → 5.1 upgrade (applied like a checkout): tokens and
   chunks embedded must be equal on both paths, and the index digests equal.
2. One-shard refreshes: N times, append a paragraph to one document (a different one each time)
   and refresh; the median wall time of the Dagster path minus the core's is the per-run overhead.

    python benchmarks/dagster_overhead.py [--edits 7]

Prints a table and then one JSON object on the last line. Compare within the run: the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core_bench import VERSIONS, django_docs, sync_folder  # noqa: E402

from rag_assets.manifest import shard_of  # noqa: E402
from rag_assets.pipeline import Indexer, RefreshReport  # noqa: E402
from rag_assets.settings import Settings  # noqa: E402
from rag_assets.store.db import connect, database_url  # noqa: E402
from rag_assets.store.serving import index_digest  # noqa: E402


def _settings(home: Path, folder: Path) -> Settings:
    return Settings.from_env({}, home=home, source_path=folder, include=("**/*.txt",))


def run_core(home: Path, folder: Path) -> tuple[float, RefreshReport]:
    idx = Indexer(_settings(home, folder))
    try:
        t0 = time.perf_counter()
        rep = idx.refresh(folder, progress=False)
        return time.perf_counter() - t0, rep
    finally:
        idx.close()


def run_dagster(home: Path, folder: Path) -> tuple[float, RefreshReport]:
    from rag_assets.defs.runner import index_via_dagster

    t0 = time.perf_counter()
    rep = index_via_dagster(_settings(home, folder), folder)
    return time.perf_counter() - t0, rep


def digest(home: Path, folder: Path) -> str:
    conn = connect(database_url(_settings(home, folder)))
    try:
        return index_digest(conn)
    finally:
        conn.close()


def rebuild_digest(work: Path, folder: Path) -> str:
    """Digest of a fresh full core build of ``folder`` (documents carry their mtime: compare per folder)."""
    home = work / f"rebuild-{folder.name}"
    run_core(home, folder)
    return digest(home, folder)


def row(name: str, wall: float, rep: RefreshReport) -> dict:
    d = rep.as_dict()
    return {
        "step": name,
        "wall_s": round(wall, 3),
        "shards_refreshed": d["shards_refreshed"],
        "chunks_embedded": d["chunks_embedded"],
        "tokens_embedded": d["tokens_embedded"],
        "docs_modified": d["docs_modified"],
        "docs_added": d["docs_added"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=7, help="one-shard refreshes per path (median reported)")
    ap.add_argument("--cache", default=".benchmarks_out/corpora")
    ap.add_argument(
        "--event-batch",
        type=int,
        default=None,
        help="set DAGSTER_EVENT_BATCH_SIZE (Dagster writes asset events in batches; 0 = one by one)",
    )
    a = ap.parse_args(argv)
    if a.event_batch is not None:
        os.environ["DAGSTER_EVENT_BATCH_SIZE"] = str(a.event_batch)
    os.environ.pop("DAGSTER_HOME", None)  # the generated instance in the embedded PostgreSQL
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    docs = {v: django_docs(Path(a.cache), v) for v in VERSIONS[:2]}
    out: dict = {"paths": {}}
    with tempfile.TemporaryDirectory(prefix="rag-dagster-overhead-") as tmp:
        work = Path(tmp)
        rows = []
        for path, fn in (("core", run_core), ("dagster", run_dagster)):
            home, folder = work / f"home-{path}", work / f"docs-{path}"
            sync_folder(docs["5.0"], folder)
            digest(home, folder)  # start the embedded server and create the schema before timing
            steps = [row("full index of 5.0", *fn(home, folder))]
            steps.append(row("no-change run", *fn(home, folder)))
            sync_folder(docs["5.1"], folder)
            steps.append(row("5.0 → 5.1", *fn(home, folder)))
            # One-shard refreshes: documents in distinct shards, one appended paragraph each.
            files = sorted(p for p in folder.rglob("*.txt") if p.stat().st_size > 2000)
            picked, seen = [], set()
            for p in files:
                s = shard_of(p.relative_to(folder).as_posix(), 64)
                if s not in seen:
                    seen.add(s)
                    picked.append(p)
                if len(picked) == a.edits:
                    break
            one = []
            for i, p in enumerate(picked):
                with p.open("a", encoding="utf-8") as f:
                    f.write(f"\n\nBenchmark edit {i}: a new closing paragraph about overhead.\n")
                wall, rep = fn(home, folder)
                assert rep.shards_refreshed == 1, rep.as_dict()
                one.append(row(f"one-shard edit {i}", wall, rep))
            out["paths"][path] = {
                "steps": steps,
                "one_shard": one,
                "one_shard_median_s": round(statistics.median(r["wall_s"] for r in one), 3),
                "digest_equals_full_rebuild": digest(home, folder) == rebuild_digest(work, folder),
            }
            rows.extend((path, r) for r in steps)
        core, dag = out["paths"]["core"], out["paths"]["dagster"]
        out["tokens_equal_5_0_to_5_1"] = (
            core["steps"][2]["tokens_embedded"] == dag["steps"][2]["tokens_embedded"]
        )
        out["digests_equal"] = core["digest_equals_full_rebuild"] and dag["digest_equals_full_rebuild"]
        out["per_run_overhead_s"] = round(dag["one_shard_median_s"] - core["one_shard_median_s"], 3)
        out["loadavg_1m"] = round(os.getloadavg()[0], 2)
        out["dagster_event_batch_size"] = int(os.environ.get("DAGSTER_EVENT_BATCH_SIZE") or 0)

    print(f"{'path':8} {'step':20} {'wall s':>8} {'shards':>7} {'chunks emb':>11} {'tokens emb':>11}")
    for path, r in rows:
        print(
            f"{path:8} {r['step']:20} {r['wall_s']:8.3f} {r['shards_refreshed']:7d}"
            f" {r['chunks_embedded']:11d} {r['tokens_embedded']:11d}"
        )
    for path in ("core", "dagster"):
        walls = ", ".join(f"{r['wall_s']:.3f}" for r in out["paths"][path]["one_shard"])
        print(f"{path:8} one-shard refresh median {out['paths'][path]['one_shard_median_s']:.3f} s ({walls})")
    print(
        f"per-run overhead of Dagster: {out['per_run_overhead_s']:.3f} s; 5.0 → 5.1 tokens equal:"
        f" {out['tokens_equal_5_0_to_5_1']}; both digests = full rebuild: {out['digests_equal']}; load {out['loadavg_1m']}"
    )
    print(json.dumps(out))
    return 0 if out["tokens_equal_5_0_to_5_1"] and out["digests_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
