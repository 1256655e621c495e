"""What a user waits for after editing one document: ``rag-assets index DOCS`` wall time, process start included.

One RAG_HOME on the embedded defaults (embedded PostgreSQL, the generated Dagster instance in it,
the hashing embedder), the Django 5.0 docs/ folder (~600 documents) indexed once. Then, ``--reps``
times each, as real subprocesses of the installed CLI:

* default:   append a paragraph to one document (a different one each time), ``rag-assets index DOCS``
  (the core's stages, then a detached recorder writes the refresh into the Dagster instance as
  runless events; "recorded" is how long after the command returned the record was in the
  instance: the benchmark polls the index's outbox, and waits for it before the next command);
* --dagster-run: the same edit, ``rag-assets index DOCS --dagster-run`` (one in-process Dagster run
  for the one stale shard, recorded in the instance: the default of earlier releases);
* --core:    the same edit, ``rag-assets index DOCS --core`` (the stages directly, no Dagster);
* no change: ``rag-assets index DOCS`` with nothing edited (the scan finds nothing: Dagster is not imported);
* start:     ``rag-assets --help`` (interpreter start and the CLI module's imports alone).

    python benchmarks/cli_edit_latency.py [--reps 5] [--cache /tmp/django-sdists]

Prints a table (median and min wall seconds, and median CPU seconds of the CLI process) and then
one JSON object on the last line. The target is ≤ 2 s for the default path. Compare within one run:
on a shared machine the absolute numbers move with the load (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_bench import django_docs  # noqa: E402

TARGET_S = 2.0


def _env(home: Path, tree: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env["RAG_HOME"] = str(home)
    env["PYTHONPATH"] = str(tree)
    return env


def _timed(env: dict, *args: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) for one CLI process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "rag_assets.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"rag-assets {' '.join(args)} failed: {p.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _record_lag(env: dict, tree: Path, timeout: float = 120.0) -> float:
    """Seconds until the index's Dagster outbox is empty (the detached recorder has written the record)."""
    sys.path.insert(0, str(tree))
    from rag_assets.settings import Settings
    from rag_assets.store.db import connect_index

    t0 = time.perf_counter()
    conn = connect_index(Settings.from_env({k: v for k, v in env.items() if k.startswith("RAG_")}))
    try:
        while time.perf_counter() - t0 < timeout:
            n = conn.execute("SELECT count(*) FROM dagster_outbox").fetchone()[0]
            if n == 0:
                return time.perf_counter() - t0
            time.sleep(0.05)
        raise SystemExit("the Dagster record did not arrive within the timeout")
    finally:
        conn.close()


def _edit(folder: Path, docs: list[Path], i: int) -> None:
    with (folder / docs[i % len(docs)]).open("a") as f:
        f.write(f"\n\nAn edit made by the latency benchmark, number {i}.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "django-sdists")
    ap.add_argument(
        "--tree",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the checkout whose rag_assets runs (default: this one); another one measures before/after",
    )
    a = ap.parse_args()

    src = django_docs(a.cache, "5.0")
    with tempfile.TemporaryDirectory(prefix="rag-cli-latency-") as tmp:
        work = Path(tmp)
        folder = work / "docs"
        shutil.copytree(src, folder)
        env = _env(work / "home", a.tree.resolve())
        docs = sorted(p.relative_to(folder) for p in folder.rglob("*.txt"))
        try:
            full_wall, _ = _timed(env, "index", str(folder), "--core")  # build once; the edits are timed
            _edit(folder, docs, 10_000)
            _timed(env, "index", str(folder))  # first default-path run creates the Dagster instance
            _record_lag(env, a.tree)
            samples: dict[str, list[tuple[float, float]]] = {
                "default": [],
                "recorded": [],
                "--dagster-run": [],
                "--core": [],
                "no change": [],
                "start": [],
            }
            for i in range(a.reps):  # interleaved, so a load spike hits every path alike
                _edit(folder, docs, 3 * i)
                samples["default"].append(_timed(env, "index", str(folder)))
                samples["recorded"].append((_record_lag(env, a.tree), 0.0))
                _edit(folder, docs, 3 * i + 1)
                samples["--dagster-run"].append(_timed(env, "index", str(folder), "--dagster-run"))
                _edit(folder, docs, 3 * i + 2)
                samples["--core"].append(_timed(env, "index", str(folder), "--core"))
                samples["no change"].append(_timed(env, "index", str(folder)))
                samples["start"].append(_timed(env, "--help"))
            n_docs = sum(1 for p in folder.rglob("*") if p.is_file())
        finally:  # the embedded server of this RAG_HOME must not outlive it
            subprocess.run(
                [sys.executable, "-m", "rag_assets.cli", "db", "stop"], env=env, capture_output=True
            )

    load = os.getloadavg()
    rows = {
        name: {
            "median_s": round(statistics.median(w for w, _ in s), 3),
            "min_s": round(min(w for w, _ in s), 3),
            "cpu_median_s": round(statistics.median(c for _, c in s), 3),
            "samples_s": [round(w, 3) for w, _ in s],
        }
        for name, s in samples.items()
    }
    print(f"one-document edit through the CLI, Django 5.0 docs ({n_docs} files), {a.reps} reps, {a.tree}")
    print(f"(full index with --core first: {full_wall:.1f} s; load average {load[0]:.2f} {load[1]:.2f})")
    print(f"{'path':<15}{'median s':>10}{'min s':>8}{'cpu s':>8}")
    for name, r in rows.items():
        print(f"{name:<15}{r['median_s']:>10.2f}{r['min_s']:>8.2f}{r['cpu_median_s']:>8.2f}")
    print("(recorded: seconds after the default command returned until its record was in the instance;"
          " the recorder's CPU is not in the cpu column)")
    d = rows["default"]["median_s"]
    print(
        f"default / --core: {d / rows['--core']['median_s']:.2f}x; "
        f"target ≤ {TARGET_S:.0f} s: {'met' if d <= TARGET_S else 'not met'}"
    )
    print(
        json.dumps(
            {
                "benchmark": "cli_edit_latency",
                "tree": str(a.tree),
                "files": n_docs,
                "reps": a.reps,
                "load_average": [round(x, 2) for x in load],
                "full_index_core_s": round(full_wall, 2),
                "target_s": TARGET_S,
                "paths": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
