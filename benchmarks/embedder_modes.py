"""Retrieval quality per embedder and mode: hashing vs the local model (torch, ONNX, ONNX int8) x
vector, keyword, hybrid, on the labelled question sets (issues 14 and 15).

For each embedder configuration, under a fresh ``RAG_HOME``, this runs what

    RAG_EMBEDDER=... RAG_LOCAL_BACKEND=... rag-assets index samples/corpus --core
    rag-assets eval samples/questions/corpus.jsonl --split dev|report --mode vector|keyword|hybrid -k 5
    rag-assets eval samples/questions/corpus.jsonl --split dev|report --mode vector|keyword|hybrid

run (the same functions, ``Indexer.refresh`` and ``rag_assets.eval.evaluate``, in one process so the
model loads once per configuration): recall@5 from the ``-k 5`` run, recall@10, MRR@10 and nDCG@10
from the default ``-k 10`` run, by relevant document, through the HNSW index as queries are served.
It also records the index time (wall clock of the first full index, model load and export included).

    python benchmarks/embedder_modes.py                                   # samples, all four embedders
    python benchmarks/embedder_modes.py --config hashing --config local-onnx-int8
    python benchmarks/embedder_modes.py --corpus django-5.0 --mode vector --mode hybrid --config local-onnx-int8

Configurations: ``hashing``, ``local-torch``, ``local-onnx``, ``local-onnx-int8``. ONNX exports are
cached under ``--onnx-home`` (default: a temporary folder; give one to reuse exports across runs).
Prints a Markdown table, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from rag_assets.embedders import embedder_fingerprint  # noqa: E402
from rag_assets.eval import evaluate, load_questions  # noqa: E402
from rag_assets.pipeline import Indexer  # noqa: E402
from rag_assets.settings import Settings  # noqa: E402
from rag_assets.store.embedded import stop_embedded  # noqa: E402

CONFIGS = {
    "hashing": {},
    "local-torch": {"RAG_EMBEDDER": "local", "RAG_LOCAL_BACKEND": "torch"},
    "local-onnx": {"RAG_EMBEDDER": "local", "RAG_LOCAL_BACKEND": "onnx"},
    "local-onnx-int8": {"RAG_EMBEDDER": "local", "RAG_LOCAL_BACKEND": "onnx-int8"},
}
MODES = ("vector", "keyword", "hybrid")


def corpus(name: str, cache: Path) -> tuple[Path, Path]:
    if name == "samples":
        return ROOT / "samples/corpus", ROOT / "samples/questions/corpus.jsonl"
    from core_bench import django_docs

    return django_docs(cache, "5.0"), ROOT / "benchmarks/questions/django-5.0.jsonl"


def measure(config: str, folder: Path, questions_path: Path, work: Path, onnx_home: Path, modes) -> dict:
    home = work / config
    shutil.rmtree(home, ignore_errors=True)
    env = {**CONFIGS[config], "RAG_HOME": str(home)}
    settings = Settings.from_env(env, source_path=folder)
    if settings.embedder == "local":
        # the exports live in RAG_HOME/models/onnx; share one folder between the fresh homes
        (home / "models").mkdir(parents=True, exist_ok=True)
        (home / "models" / "onnx").symlink_to(onnx_home, target_is_directory=True)
    questions = load_questions(questions_path)
    t0 = time.perf_counter()
    idx = Indexer(settings)
    try:
        rep = idx.refresh(folder, progress=False).as_dict()
    finally:
        idx.close()
    out = {"config": config, "fingerprint": embedder_fingerprint(settings), "documents": rep["docs_total"], "chunks": rep["chunks_total"],
           "index_s": round(time.perf_counter() - t0, 1), "rows": []}  # fmt: skip
    try:
        for split in ("dev", "report"):
            for mode in modes:
                at5 = evaluate(settings, questions, k=5, mode=mode, split=split)
                at10 = evaluate(settings, questions, k=10, mode=mode, split=split)
                out["rows"].append({
                    "split": split, "mode": mode, "n": at10.n,
                    "recall@5": round(at5.docs.recall, 3), "recall@10": round(at10.docs.recall, 3),
                    "mrr@10": round(at10.docs.mrr, 3), "ndcg@10": round(at10.docs.ndcg, 3),
                })  # fmt: skip
    finally:
        stop_embedded(home)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", choices=list(CONFIGS), help="repeatable; default all")
    ap.add_argument("--mode", action="append", choices=MODES, help="repeatable; default all")
    ap.add_argument("--corpus", choices=("samples", "django-5.0"), default="samples")
    ap.add_argument("--work", type=Path, help="folder for the fresh RAG_HOMEs (default: a temporary one)")
    ap.add_argument("--onnx-home", type=Path, help="ONNX export cache shared by the runs")
    ap.add_argument("--cache", type=Path, default=Path(".benchmarks_out/corpora"), help="Django sdist cache")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, questions = corpus(args.corpus, args.cache)
    work = args.work or Path(tempfile.mkdtemp(prefix="ragmodes-"))
    onnx_home = (args.onnx_home or work / "onnx-cache").resolve()
    onnx_home.mkdir(parents=True, exist_ok=True)
    runs = [measure(c, folder, questions, work, onnx_home, args.mode or MODES) for c in args.config or CONFIGS]

    print(f"{args.corpus}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| embedder | index s | split (n) | mode | recall@5 | recall@10 | MRR@10 | nDCG@10 |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for r in runs:
        for m in r["rows"]:
            print(
                f"| {r['config']} | {r['index_s']} | {m['split']} ({m['n']}) | {m['mode']} | {m['recall@5']:.3f} "
                f"| {m['recall@10']:.3f} | {m['mrr@10']:.3f} | {m['ndcg@10']:.3f} |"
            )
    print(json.dumps({"corpus": args.corpus, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
