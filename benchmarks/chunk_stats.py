"""Chunk statistics and upgrade re-embedding cost, structure chunker vs the fixed 512-word window.

Why: the index only embeds chunk texts it has never seen, so the cost of moving a corpus from one
version to the next is the number of chunk texts in the new version that were absent from the
old one. This script measures that set difference over whole corpora (by default the Django 5.0,
5.1 and 5.2 docs, if present), next to what re-embedding every changed document would cost, for
both chunkers, plus chunk-size statistics and chunking speed.

    python benchmarks/chunk_stats.py                       # the Django docs under /work/corpora
    python benchmarks/chunk_stats.py --corpus A --corpus B  # any folders, compared in order

Prints a table, then one JSON object with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rag_assets.chunking import Chunker, FixedWindowChunker, StructureChunker, count_tokens  # noqa: E402

try:  # mirror what the folder source indexes
    from rag_assets.settings import DEFAULT_INCLUDE
except Exception:  # pragma: no cover - settings module unavailable
    DEFAULT_INCLUDE = ("**/*.md", "**/*.markdown", "**/*.mdx", "**/*.rst", "**/*.txt")

DEFAULT_CORPORA = (
    "/work/corpora/Django-5.0.14/docs",
    "/work/corpora/django-5.1.15/docs",
    "/work/corpora/django-5.2.19/docs",
)


def read_corpus(root: Path, include: tuple[str, ...]) -> dict[str, str]:
    """Relative path -> normalised text, read exactly as the folder source does."""
    paths: set[Path] = set()
    for pattern in include:
        paths.update(p for p in root.glob(pattern) if p.is_file())
    docs: dict[str, str] = {}
    for p in sorted(paths):
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            continue
        docs[p.relative_to(root).as_posix()] = text.replace("\r\n", "\n").replace("\r", "\n")
    return docs


def label(root: Path) -> str:
    return root.parent.name if root.name == "docs" else root.name


def chunk_corpus(
    chunker: Chunker, docs: dict[str, str], repeat: int
) -> tuple[dict[str, list[str]], float, float]:
    """Chunk texts per document, and the best wall and CPU time over ``repeat`` runs (CPU time is
    what to compare on a shared machine, where wall time includes waiting for a core)."""
    best_wall = best_cpu = float("inf")
    out: dict[str, list[str]] = {}
    for _ in range(max(1, repeat)):
        w0, c0 = time.perf_counter(), time.process_time()
        result = {doc_id: chunker.chunk(text) for doc_id, text in docs.items()}
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
        out = {doc_id: [c.text for c in chunks] for doc_id, chunks in result.items()}
    return out, best_wall, best_cpu


def size_stats(chunks: dict[str, list[str]]) -> dict[str, float | int]:
    lengths = np.array([len(t) for ts in chunks.values() for t in ts], dtype=np.int64)
    tokens = [count_tokens(t) for ts in chunks.values() for t in ts]
    return {
        "files": len(chunks),
        "chunks": int(lengths.size),
        "mean_chars": round(float(lengths.mean()), 1) if lengths.size else 0.0,
        "median_chars": float(statistics.median(lengths.tolist())) if lengths.size else 0.0,
        "p95_chars": round(float(np.percentile(lengths, 95)), 1) if lengths.size else 0.0,
        "max_tokens": max(tokens, default=0),
        "total_tokens": int(sum(tokens)),
    }


def upgrade_cost(
    old_docs: dict[str, str],
    new_docs: dict[str, str],
    old_chunks: dict[str, list[str]],
    new_chunks: dict[str, list[str]],
) -> dict[str, int]:
    """What moving the index from ``old`` to ``new`` costs.

    ``new_chunk_texts``: distinct chunk texts of the new version absent from the old version (a
    content-addressed cache embeds exactly these). ``changed_docs_*``: every chunk of every
    document that is new or whose text changed (what per-document re-embedding would pay).
    """
    old_texts = {t for ts in old_chunks.values() for t in ts}
    new_texts = {t for ts in new_chunks.values() for t in ts}
    fresh = new_texts - old_texts
    changed = [d for d, text in new_docs.items() if old_docs.get(d) != text]
    changed_chunks = [t for d in changed for t in new_chunks[d]]
    return {
        "changed_docs": len(changed),
        "new_chunk_texts": len(fresh),
        "new_chunk_tokens": sum(count_tokens(t) for t in fresh),
        "changed_docs_chunks": len(changed_chunks),
        "changed_docs_tokens": sum(count_tokens(t) for t in changed_chunks),
        "new_version_chunks": sum(len(ts) for ts in new_chunks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--corpus",
        action="append",
        metavar="DIR",
        help="a corpus folder (repeatable, compared in the order given); "
        "default: the Django 5.0/5.1/5.2 docs under /work/corpora, if present",
    )
    ap.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help=f"file pattern (repeatable); default: the folder source's {', '.join(DEFAULT_INCLUDE)}",
    )
    ap.add_argument("--max-tokens", type=int, default=512, help="structure chunker bound (default 512)")
    ap.add_argument("--repeat", type=int, default=3, help="time the best of N runs (default 3)")
    args = ap.parse_args(argv)

    roots = [Path(p) for p in (args.corpus or [p for p in DEFAULT_CORPORA if Path(p).is_dir()])]
    if not roots:
        ap.error("no corpus: pass --corpus DIR (the default Django docs folders are not present)")
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        ap.error(f"not a directory: {', '.join(missing)}")
    include = tuple(args.include or DEFAULT_INCLUDE)

    corpora = [(label(r), read_corpus(r, include)) for r in roots]
    chunkers: dict[str, Chunker] = {
        "structure": StructureChunker(max_tokens=args.max_tokens),
        "fixed": FixedWindowChunker(),
    }

    report: dict[str, object] = {
        "corpora": {
            name: {"path": str(r), "bytes": sum(len(t.encode()) for t in docs.values())}
            for (name, docs), r in zip(corpora, roots, strict=True)
        },
        "chunkers": {},
    }
    rows: list[tuple[str, ...]] = []
    up_rows: list[tuple[str, ...]] = []
    for cname, chunker in chunkers.items():
        per_corpus: dict[str, dict[str, object]] = {}
        results: list[dict[str, list[str]]] = []
        for name, docs in corpora:
            chunks, seconds, cpu = chunk_corpus(chunker, docs, args.repeat)
            results.append(chunks)
            stats = {**size_stats(chunks), "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}
            per_corpus[name] = stats
            rows.append(
                (
                    cname,
                    name,
                    str(stats["files"]),
                    str(stats["chunks"]),
                    f"{stats['mean_chars']:.0f}",
                    f"{stats['median_chars']:.0f}",
                    f"{stats['p95_chars']:.0f}",
                    str(stats["max_tokens"]),
                    f"{seconds:.3f}",
                    f"{cpu:.3f}",
                )
            )
        upgrades: dict[str, dict[str, int]] = {}
        for k in range(1, len(corpora)):
            (old_name, old_docs), (new_name, new_docs) = corpora[k - 1], corpora[k]
            cost = upgrade_cost(old_docs, new_docs, results[k - 1], results[k])
            key = f"{old_name} -> {new_name}"
            upgrades[key] = cost
            up_rows.append(
                (
                    cname,
                    key,
                    str(cost["changed_docs"]),
                    str(cost["new_chunk_texts"]),
                    str(cost["new_chunk_tokens"]),
                    str(cost["changed_docs_chunks"]),
                    str(cost["changed_docs_tokens"]),
                    f"{100 * cost['new_chunk_texts'] / max(1, cost['new_version_chunks']):.1f}%",
                )
            )
        report["chunkers"][cname] = {"version": chunker.version, "corpora": per_corpus, "upgrades": upgrades}

    print_table(
        (
            "chunker",
            "corpus",
            "files",
            "chunks",
            "mean ch",
            "median ch",
            "p95 ch",
            "max tok",
            "seconds",
            "cpu s",
        ),
        rows,
    )
    if up_rows:
        print()
        print_table(
            (
                "chunker",
                "upgrade",
                "changed docs",
                "new chunk texts",
                "their tokens",
                "changed-doc chunks",
                "their tokens",
                "new/all",
            ),
            up_rows,
        )
    print()
    print(json.dumps(report, sort_keys=True))
    return 0


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt.format(*r))


if __name__ == "__main__":
    raise SystemExit(main())
