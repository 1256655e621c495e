"""What Dagster costs on top of the core: per-run overhead, and proof that it adds no embedding work.

Three environments on the embedded defaults (each its own RAG_HOME, embedded PostgreSQL, and for the
Dagster paths the generated Dagster instance in that PostgreSQL), fed the same folders:

* core:     ``Indexer.refresh`` in process (``rag-assets index --core``);
* recorded: ``index_recorded(record="wait")``, the path of plain ``rag-assets index``: the core's
  refresh, then its runless materializations and check evaluations written into the Dagster instance
  (in this process, waited for; the CLI does it in a detached process);
* run:      ``index_via_dagster``, the path of ``rag-assets index --dagster-run``: stale shards found
  as the sensors find them, then in-process range runs recorded in the Dagster instance.

Steps, each through every path:

1. Django docs 5.0 full index, then the upgrades 5.0 → 5.1 → 5.2 → 5.0 (applied like a checkout):
   tokens embedded must be equal on every path, and each index digest equal to a full build.
2. One-shard refreshes: N times, append a paragraph to one document (a different one each time)
   and refresh; the median wall time of a path minus the core's is its per-refresh overhead.

Dagster's share of a step = (path wall − core wall) / core wall (target ≤ 25%).

    python benchmarks/dagster_overhead.py [--edits 7] [--paths core,recorded,run]

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
from dataclasses import replace
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
        rep = idx.refresh(folder, progress=False, allow_deletes=True)
        return time.perf_counter() - t0, rep
    finally:
        idx.close()


def run_dagster(home: Path, folder: Path) -> tuple[float, RefreshReport]:
    from rag_assets.defs.runner import index_via_dagster

    t0 = time.perf_counter()
    rep = index_via_dagster(_settings(home, folder), folder, allow_deletes=True)
    return time.perf_counter() - t0, rep


TIMINGS: list[dict] = []  # the recorded path's split of each call: core vs record, wall and CPU


def run_recorded(home: Path, folder: Path) -> tuple[float, RefreshReport]:
    from rag_assets.defs.recorded import index_recorded

    t0 = time.perf_counter()
    timings: dict = {}
    rep = index_recorded(_settings(home, folder), folder, allow_deletes=True, record="wait", timings=timings)
    TIMINGS.append(timings)
    return time.perf_counter() - t0, rep


def warm_dagster(home: Path, folder: Path) -> float:
    """Import Dagster and create the instance's tables (once per process and instance), untimed by the steps."""
    t0 = time.perf_counter()
    import dagster  # noqa: F401

    from rag_assets.dagster_instance import instance

    instance(_settings(home, folder)).get_runs(limit=1)
    return time.perf_counter() - t0


PATHS = {"core": None, "recorded": run_recorded, "run": run_dagster}


def digest(home: Path, folder: Path) -> str:
    conn = connect(database_url(_settings(home, folder)))
    try:
        return index_digest(conn)
    finally:
        conn.close()


_REBUILDS = iter(range(10**6))


def rebuild_digest(work: Path, folder: Path) -> str:
    """Digest of a fresh full core build of ``folder`` (its own schema: documents carry their mtime,
    so compare per folder)."""
    home = work / f"rebuild-{folder.name}"
    s = replace(_settings(home, folder), pg_schema=f"rebuild_{next(_REBUILDS)}")
    idx = Indexer(s)
    try:
        idx.refresh(folder, progress=False, full=True)
        return index_digest(idx.conn)
    finally:
        idx.close()


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
    ap.add_argument("--paths", default="core,recorded,run", help="comma-separated: core, recorded, run")
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
    paths = [p for p in a.paths.split(",") if p]
    if "core" not in paths:
        paths.insert(0, "core")
    docs = {v: django_docs(Path(a.cache), v) for v in VERSIONS}
    upgrades = [("5.0", "5.1"), ("5.1", "5.2"), ("5.2", "5.0")]
    out: dict = {"paths": {}, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="rag-dagster-overhead-") as tmp:
        work = Path(tmp)
        for path in paths:
            fn = PATHS[path] or run_core
            home, folder = work / f"home-{path}", work / f"docs-{path}"
            sync_folder(docs["5.0"], folder)
            digest(home, folder)  # start the embedded server and create the schema before timing
            warm = warm_dagster(home, folder) if path != "core" else 0.0
            TIMINGS.clear()
            steps = [row("full index of 5.0", *fn(home, folder))]
            steps.append(row("no-change run", *fn(home, folder)))
            digests_ok = [digest(home, folder) == rebuild_digest(work, folder)]
            for a_v, b_v in upgrades:
                sync_folder(docs[b_v], folder)
                steps.append(row(f"{a_v} → {b_v}", *fn(home, folder)))
                digests_ok.append(digest(home, folder) == rebuild_digest(work, folder))
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
                assert rep.docs_modified == 1, rep.as_dict()
                one.append(row(f"one-shard edit {i}", wall, rep))
            digests_ok.append(digest(home, folder) == rebuild_digest(work, folder))
            if path == "recorded":  # the same call's core part and record part, side by side
                for r, t in zip(steps + one, TIMINGS, strict=True):
                    r.update({k: round(v, 3) for k, v in t.items()})
                    r["record_share"] = round(t["record_s"] / max(t["core_s"], 1e-6), 3)
                    r["record_cpu_share"] = round(t["record_cpu_s"] / max(t["core_cpu_s"], 1e-6), 3)
            out["paths"][path] = {
                "warm_up_s": round(warm, 3),
                "steps": steps,
                "one_shard": one,
                "one_shard_median_s": round(statistics.median(r["wall_s"] for r in one), 3),
                "digest_equals_full_rebuild": all(digests_ok),
            }
        core = out["paths"]["core"]
        out["tokens_equal"] = all(
            [r["tokens_embedded"] for r in out["paths"][p]["steps"]] == [r["tokens_embedded"] for r in core["steps"]]
            for p in paths
        )
        out["digests_equal"] = all(out["paths"][p]["digest_equals_full_rebuild"] for p in paths)
        out["share"] = {
            p: [
                round((r["wall_s"] - c["wall_s"]) / c["wall_s"], 3) if c["wall_s"] > 0 else None
                for r, c in zip(out["paths"][p]["steps"], core["steps"], strict=True)
            ]
            for p in paths
            if p != "core"
        }
        out["per_refresh_overhead_s"] = {
            p: round(out["paths"][p]["one_shard_median_s"] - core["one_shard_median_s"], 3) for p in paths if p != "core"
        }
        out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        out["dagster_event_batch_size"] = int(os.environ.get("DAGSTER_EVENT_BATCH_SIZE") or 0)

    names = [r["step"] for r in core["steps"]]
    print(f"{'step':20} " + " ".join(f"{p + ' s':>12}" for p in paths) + " " + " ".join(
        f"{p + ' share':>15}" for p in paths if p != "core") + f" {'tokens emb':>11}")
    for i, name in enumerate(names):
        walls = " ".join(f"{out['paths'][p]['steps'][i]['wall_s']:12.3f}" for p in paths)
        shares = " ".join(
            f"{out['share'][p][i] * 100:14.0f}%" if out["share"][p][i] is not None else f"{'–':>15}"
            for p in paths if p != "core"
        )
        print(f"{name:20} {walls} {shares} {core['steps'][i]['tokens_embedded']:11d}")
    if "recorded" in paths:
        rec = out["paths"]["recorded"]
        print("recorded path, one call split (wall s: core / record = share; CPU s of this process: core / record = share)")
        for r in rec["steps"] + rec["one_shard"]:
            print(
                f"  {r['step']:20} {r['core_s']:8.3f} / {r['record_s']:6.3f} = {r['record_share'] * 100:4.0f}%"
                f"   cpu {r['core_cpu_s']:7.3f} / {r['record_cpu_s']:6.3f} = {r['record_cpu_share'] * 100:4.0f}%"
            )
    for path in paths:
        if path != "core":
            print(f"{path:8} warm-up (import Dagster, open the instance, create its tables): {out['paths'][path]['warm_up_s']:.2f} s")
        walls = ", ".join(f"{r['wall_s']:.3f}" for r in out["paths"][path]["one_shard"])
        print(f"{path:8} one-shard refresh median {out['paths'][path]['one_shard_median_s']:.3f} s ({walls})")
    print(
        f"per-refresh overhead: {out['per_refresh_overhead_s']}; tokens equal on every path: {out['tokens_equal']}; "
        f"every digest = full rebuild: {out['digests_equal']}; load {out['loadavg_start']} → {out['loadavg_end']}"
    )
    print(json.dumps(out))
    return 0 if out["tokens_equal"] and out["digests_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
