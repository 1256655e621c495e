"""Retrieval quality on the shipped question sets: recall@5, MRR@10 and nDCG@10 per split.

Indexes each corpus with the core pipeline (``Indexer.refresh``, the stages ``rag-assets index --core``
runs; the Dagster path builds the same index) under the settings of README command 1 (embedded
defaults: hashing embedder, structure chunker, 64 shards), each in its own Postgres schema of one
temporary embedded server, then runs ``rag_assets.eval.evaluate`` on the dev and report splits, through the
HNSW index as queries are served (``hnsw``), and by exact distance (``exact``: the embedder and chunker
without the graph's approximation, which differs between two builds of the same corpus).

- ``samples``: ``samples/corpus`` with ``samples/questions/corpus.jsonl``;
- ``django-5.0``: the ``docs/`` folder of the newest Django 5.0 sdist (``pip download --no-deps
  --no-binary :all: "django==5.0.*"``, unpacked once into ``--cache``) with
  ``benchmarks/questions/django-5.0.jsonl``. Every labelled document must exist in that folder: a
  missing one stops the run, naming it.

Only the report split's figures are published; nothing is tuned on them (samples/questions/README.md).

    python benchmarks/retrieval_quality.py                 # both sets
    python benchmarks/retrieval_quality.py --skip-django   # samples only, no download

Prints a Markdown table and then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from core_bench import django_docs  # noqa: E402

from rag_assets.eval import evaluate, load_questions, missing_docs  # noqa: E402
from rag_assets.pipeline import Indexer  # noqa: E402
from rag_assets.settings import Settings  # noqa: E402
from rag_assets.sources import FolderSource  # noqa: E402
from rag_assets.store.embedded import stop_embedded  # noqa: E402


def measure(name: str, folder: Path, questions_path: Path, home: Path) -> dict:
    questions = load_questions(questions_path)
    schema = "eval_" + name.replace("-", "_").replace(".", "_")
    settings = Settings.from_env({}, home=home, pg_schema=schema, index_name=schema, source_path=folder)
    docs = FolderSource(folder, include=settings.include, exclude=settings.exclude)
    missing = missing_docs(questions, docs.scan().stats)
    if missing:
        raise SystemExit(f"{questions_path}: relevant documents not in {folder}: {missing}")
    t0 = time.perf_counter()
    idx = Indexer(settings)
    try:
        rep = idx.refresh(folder, progress=False).as_dict()
    finally:
        idx.close()
    out = {
        "corpus": name,
        "documents": rep["docs_total"],
        "chunks": rep["chunks_total"],
        "index_s": round(time.perf_counter() - t0, 2),
        "splits": {},
    }
    for split, search in (("dev", "hnsw"), ("dev", "exact"), ("report", "hnsw"), ("report", "exact")):
        ev = evaluate(settings, questions, k=10, split=split, exact=search == "exact")
        out["splits"][f"{split} {search}"] = {
            "n": ev.n,
            "recall@5": round(ev.at(5).recall, 3),
            "recall@10": round(ev.docs.recall, 3),
            "mrr@10": round(ev.docs.mrr, 3),
            "ndcg@10": round(ev.docs.ndcg, 3),
            "query_p50_ms": round(ev.as_dict()["seconds_p50"] * 1000, 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="folder for the embedded server (default: a temporary one)")
    ap.add_argument("--cache", default=".benchmarks_out/corpora", help="where the Django sdist is unpacked")
    ap.add_argument("--skip-django", action="store_true")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rageval-"))
    home = work / "home"
    runs = []
    try:
        runs.append(
            measure("samples", ROOT / "samples/corpus", ROOT / "samples/questions/corpus.jsonl", home)
        )
        if not args.skip_django:
            folder = django_docs(Path(args.cache), "5.0")
            runs.append(measure("django-5.0", folder, ROOT / "benchmarks/questions/django-5.0.jsonl", home))
    finally:
        stop_embedded(home)
    print("| corpus | split, search | n | recall@5 | recall@10 | MRR@10 | nDCG@10 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in runs:
        for split, m in r["splits"].items():
            print(
                f"| {r['corpus']} ({r['documents']} docs, {r['chunks']} chunks) | {split} | {m['n']} "
                f"| {m['recall@5']:.3f} | {m['recall@10']:.3f} | {m['mrr@10']:.3f} | {m['ndcg@10']:.3f} |"
            )
    print(json.dumps({"runs": runs}))


if __name__ == "__main__":
    main()
