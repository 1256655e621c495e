"""Formats benchmark: the PDF manuals of Debian's texlive-latex-base-doc through rag_assets.formats.

Pass 1 converts every PDF (through the parse cache, in a ConversionWorker process: the production
path with the per-document time limit) and reports pages/s, characters, structure-chunker chunks and
failures by kind; pass 2 reads the same files again and must parse nothing (every conversion a
cache hit). The package is fetched with Debian's own client if no folder is given:

    python benchmarks/formats.py                          # apt-get download + dpkg-deb -x into --cache
    python benchmarks/formats.py --pdf-dir /tmp/texlive/x --database-url postgresql://...

Prints a table and then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_assets.chunking import make_chunker  # noqa: E402
from rag_assets.formats import (  # noqa: E402
    ConversionWorker,
    FormatError,
    FormatLimits,
    ParseStats,
    convert_cached,
    converter_for,
    formats_code_version,
)
from rag_assets.store.db import connect  # noqa: E402

PACKAGE = "texlive-latex-base-doc"


def fetch_pdfs(cache: Path) -> Path:
    """Download and unpack the Debian package once (``apt-get download``: no root needed)."""
    root = cache / PACKAGE
    if not (root / "x").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", PACKAGE], cwd=root, check=True)
        deb = next(root.glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), "x"], cwd=root, check=True)
    return root / "x"


def fresh_db(server_url: str) -> str:
    name = f"bench_formats_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def run_pass(conn, files: list[Path], root: Path, worker: ConversionWorker, chunk: bool) -> dict:
    stats = ParseStats()
    failures: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    pages = text_pages = chars = chunks = 0
    chunk_s = 0.0
    chunker = make_chunker("structure", 512)
    t0 = time.perf_counter()
    for f in files:
        doc_id = f.relative_to(root).as_posix()
        try:
            conv = convert_cached(conn, doc_id, f.read_bytes(), "pdf", worker=worker, stats=stats)
        except FormatError as e:
            failures[e.kind] += 1
            examples.setdefault(e.kind, str(e)[:160])
            continue
        pages += conv.pages[-1].number if conv.pages else 0  # up to the last page with text
        text_pages += len(conv.pages)
        chars += len(conv.text)
        if chunk:
            t = time.perf_counter()
            chunks += len(chunker.chunk(conv.text))
            chunk_s += time.perf_counter() - t
    seconds = time.perf_counter() - t0 - chunk_s
    return {
        "files": len(files),
        "converted": len(files) - sum(failures.values()),
        "pages": pages,
        "pages_with_text": text_pages,
        "chars": chars,
        "chunks": chunks if chunk else None,
        "seconds": round(seconds, 2),
        "pages_per_s": round(pages / seconds, 1) if seconds else None,
        "parsed": stats.misses,
        "cache_hits": stats.hits,
        "bytes_parsed": stats.bytes_parsed,
        "failures": dict(failures),
        "failure_examples": examples,
        "chunk_seconds": round(chunk_s, 2) if chunk else None,
        "worker_processes": worker.started,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pdf-dir", default=None, help="a folder of PDFs (default: the Debian package, fetched)")
    ap.add_argument("--cache", default=".benchmarks_out/corpora")
    ap.add_argument("--work", default=os.environ.get("RAG_BENCH_DIR") or tempfile.mkdtemp(prefix="ragbench-formats-"))
    ap.add_argument("--database-url", default=None, help="a server URL (default: a temporary embedded server)")
    ap.add_argument("--timeout-s", type=float, default=FormatLimits().timeout_s)
    args = ap.parse_args(argv)
    root = Path(args.pdf_dir) if args.pdf_dir else fetch_pdfs(Path(args.cache))
    files = sorted(root.rglob("*.pdf"))
    if not files:
        print(f"no PDF under {root}", file=sys.stderr)
        return 2
    server = args.database_url
    home = Path(args.work) / "server"
    if server is None:
        from rag_assets.store.embedded import embedded_url

        server = embedded_url(home)
    limits = FormatLimits(timeout_s=args.timeout_s)
    try:
        conn = connect(fresh_db(server))
        try:
            with ConversionWorker(limits) as worker:
                first = run_pass(conn, files, root, worker, chunk=True)
                second = run_pass(conn, files, root, worker, chunk=False)
        finally:
            conn.close()
    finally:
        if args.database_url is None:  # the embedded server outlives its starter: stop ours
            from rag_assets.store.embedded import stop_embedded

            stop_embedded(home)
    result = {
        "corpus": f"{PACKAGE} ({len(files)} PDFs, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB)",
        "converter": converter_for("pdf").key,
        "formats_code_version": formats_code_version(),
        "first_pass": first,
        "second_pass_cached": second,
    }
    rows = [
        ("PDFs", first["files"], second["files"]),
        ("converted", first["converted"], second["converted"]),
        ("pages", first["pages"], second["pages"]),
        ("characters", first["chars"], second["chars"]),
        ("chunks (structure, 512 tokens)", first["chunks"], "-"),
        ("documents parsed", first["parsed"], second["parsed"]),
        ("parse-cache hits", first["cache_hits"], second["cache_hits"]),
        ("seconds (excluding chunking)", first["seconds"], second["seconds"]),
        ("pages/s", first["pages_per_s"], second["pages_per_s"]),
        ("failures by kind", first["failures"] or "none", second["failures"] or "none"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'pass 1 (parse)':>16}  {'pass 2 (cache)':>16}")
    for name, a, b in rows:
        print(f"{name:{width}}  {a!s:>16}  {b!s:>16}")
    for kind, ex in first["failure_examples"].items():
        print(f"  e.g. {kind}: {ex}")
    print(json.dumps(result))
    return 0 if second["parsed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
