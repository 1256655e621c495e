"""Keyword and hybrid quality at several keyword candidate budgets (``rag_assets.query.KEYWORD_CANDIDATES``).

Indexes ``samples/corpus`` and the Django 5.0 ``docs/`` folder once each (``Indexer.refresh``, README
command 1's settings, as ``benchmarks/retrieval_quality.py`` does), then evaluates keyword and hybrid mode
(``rag_assets.eval.evaluate``, what ``rag-assets eval FILE --split S --mode M [-k 5]`` runs) on one split
at each budget, on the same rows and HNSW graph, so only the keyword matching differs between rows.
A budget of 1000000000 keeps every word and caps nothing: the any-word matching of earlier releases.

    python benchmarks/keyword_candidates.py --split dev --budgets 1000000000 4000 2000 1000 500

Tune on ``dev`` only (samples/questions/README.md). Prints a Markdown table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from core_bench import django_docs  # noqa: E402

import rag_assets.query as query  # noqa: E402
from rag_assets.eval import evaluate, load_questions  # noqa: E402
from rag_assets.pipeline import Indexer  # noqa: E402
from rag_assets.settings import Settings  # noqa: E402
from rag_assets.store.embedded import stop_embedded  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="dev")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1_000_000_000, 4000, 2000, 1000, 500])
    ap.add_argument("--modes", nargs="+", default=["keyword", "hybrid"])
    ap.add_argument("--cache", default=".benchmarks_out/corpora", help="where the Django sdist is unpacked")
    ap.add_argument("--skip-django", action="store_true")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ragkw-")) / "home"
    sets = [("samples", ROOT / "samples/corpus", ROOT / "samples/questions/corpus.jsonl")]
    if not args.skip_django:
        sets.append(("django-5.0", django_docs(Path(args.cache), "5.0"), ROOT / "benchmarks/questions/django-5.0.jsonl"))
    rows = []
    try:
        configs = []
        for name, folder, qpath in sets:
            schema = "kw_" + name.replace("-", "_").replace(".", "_")
            settings = Settings.from_env({}, home=home, pg_schema=schema, index_name=schema, source_path=folder)
            idx = Indexer(settings)
            try:
                chunks = idx.refresh(folder, progress=False).chunks_total
            finally:
                idx.close()
            configs.append((name, chunks, settings, load_questions(qpath)))
        for budget in args.budgets:
            query.KEYWORD_CANDIDATES = budget
            for name, chunks, settings, questions in configs:
                for mode in args.modes:
                    at5 = evaluate(settings, questions, k=5, mode=mode, split=args.split)
                    at10 = evaluate(settings, questions, k=10, mode=mode, split=args.split)
                    rows.append(
                        {
                            "budget": budget,
                            "corpus": name,
                            "chunks": chunks,
                            "split": args.split,
                            "n": len(at10.results),
                            "mode": mode,
                            **{m: round(v, 4) for m, v in at5.as_dict()["metrics"].items()},
                            **{m: round(v, 4) for m, v in at10.as_dict()["metrics"].items()},
                        }
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        stop_embedded(home)
    cols = ("recall@5", "mrr@5", "ndcg@5", "recall@10", "mrr@10", "ndcg@10")
    print("| budget | corpus (chunks) | split (n) | mode | " + " | ".join(cols) + " |")
    print("|---:|---|---|---|" + "---:|" * len(cols))
    for r in rows:
        print(
            f"| {r['budget']} | {r['corpus']} ({r['chunks']}) | {r['split']} ({r['n']}) | {r['mode']} | "
            + " | ".join(f"{r[c]:.3f}" for c in cols)
            + " |"
        )
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
