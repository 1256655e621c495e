"""The cost story in dollars: Django docs 5.0 → 5.1 → 5.2 through the OpenAI provider, priced from recorded runs.

Runs the real CLI (`rag-assets index --core --json`, then `rag-assets cost --json`) with
``RAG_EMBEDDER=openai`` and ``RAG_EMBEDDING_MODEL=text-embedding-3-small`` against the fake OpenAI
embeddings server of the test suite (real HTTP on 127.0.0.1; it answers with deterministic vectors and
no latency), so every token goes through the provider client and is priced by the project's price
table (0.02 USD per million tokens for text-embedding-3-small), not estimated. For each refresh: tokens
embedded, what they cost, and what re-embedding the whole corpus at that version would have cost.

Spend is priced on the provider's reported usage, as on a real bill; the fake reports len(text) // 4
per input, about 9% above the cl100k count that OpenAI would report (and that prices the full
re-embed column), so the fake's spend is slightly pessimistic.

    python benchmarks/cost_table.py [--price-per-mtok 0.02]

Prints a table and then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from core_bench import VERSIONS, django_docs, sync_folder  # noqa: E402

from tests.fake_openai import FakeOpenAI  # noqa: E402


def cli(env: dict, *args: str) -> dict:
    r = subprocess.run(["rag-assets", *args], env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"rag-assets {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=".benchmarks_out/corpora")
    ap.add_argument("--model", default="text-embedding-3-small")
    ap.add_argument("--dims", type=int, default=256, help="RAG_EMBEDDING_DIMENSIONS (the fake honours it)")
    a = ap.parse_args(argv)
    docs = {v: django_docs(Path(a.cache), v) for v in VERSIONS}
    steps = []
    with tempfile.TemporaryDirectory(prefix="rag-cost-") as tmp, FakeOpenAI(dims=a.dims) as srv:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_HOME", "OPENAI_"))}
        env.update(
            RAG_HOME=str(work / "home"),
            RAG_INCLUDE="**/*.txt",
            RAG_EMBEDDER="openai",
            RAG_EMBEDDING_BASE_URL=srv.url,
            RAG_EMBEDDING_API_KEY="sk-benchmark-not-a-secret",
            RAG_EMBEDDING_MODEL=a.model,
            RAG_EMBEDDING_DIMENSIONS=str(a.dims),
        )
        env.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
        folder = work / "docs"
        for label, v in (("full index of 5.0", "5.0"), ("5.0 → 5.1", "5.1"), ("5.1 → 5.2", "5.2")):
            sync_folder(docs[v], folder)
            d = cli(env, "index", "--core", str(folder), "--json")
            emb = d.get("embedding") or {}
            steps.append(
                {
                    "step": label,
                    "tokens_embedded": d["tokens_embedded"],
                    "chunks_embedded": d["chunks_embedded"],
                    "cost_usd": d["cost_usd"],
                    "full_reembed_tokens": d["full_reembed_tokens"],
                    # the whole corpus at this version re-embedded = what was spent + what the cache avoided
                    "full_reembed_cost_usd": d["cost_usd"] + d["cost_avoided_usd"],
                    "provider_tokens": emb.get("tokens"),
                    "provider_requests": emb.get("requests"),
                }
            )
        summary = cli(env, "cost", "--json")
        requests = srv.request_count
    print(f"model {a.model}; price from the project's table; {requests} HTTP requests to the fake API")
    print(
        f"{'step':20} {'tokens emb':>11} {'cost $':>10} {'full re-embed tok':>18} {'full $':>10} {'saved':>7}"
    )
    for s in steps:
        full = s["full_reembed_cost_usd"] or 0.0
        saved = 1 - (s["cost_usd"] or 0.0) / full if full else 0.0
        s["saved_pct"] = round(100 * saved, 1)
        print(
            f"{s['step']:20} {s['tokens_embedded']:11,d} {s['cost_usd']:10.6f}"
            f" {s['full_reembed_tokens']:18,d} {full:10.6f} {s['saved_pct']:6.1f}%"
        )
    t = summary["total"]
    print(
        f"`rag-assets cost`: {t['runs']} runs, {t['tokens_embedded']:,} tokens, {t['cost_usd']:.6f} USD;"
        f" full re-embeds would have cost {t['full_reembed_cost_usd']:.6f} USD ({t['saved_pct']}% saved)"
    )
    print(json.dumps({"model": a.model, "steps": steps, "cost_summary": summary, "requests": requests}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
