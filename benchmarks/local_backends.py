"""The local model's backends: torch (sentence-transformers) vs ONNX Runtime fp32 vs ONNX int8.

Why: the local all-MiniLM-L6-v2 embeds about a dozen ~1,000-character chunks a second on two cores
through PyTorch (issue 15). This measures chunks/s of each backend on the same chunks of the sample
corpus, and how close its vectors are to the torch float32 ones (cosine, mean and min over the
chunks), so a faster backend is only chosen when its vectors are the same for retrieval purposes.
Retrieval recall per backend comes from ``rag-assets eval`` (docs/benchmarks.md).

    python benchmarks/local_backends.py                       # 300 chunks, batch 32, every backend
    python benchmarks/local_backends.py --texts 600 --backend torch --backend onnx-int8
    python benchmarks/local_backends.py --cache /tmp/onnx-cache  # where exports go (default: a temp dir)

The first use of an ONNX backend exports (and, for int8, quantises) the model into the cache; that
time is reported as ``export_seconds`` and not counted in chunks/s. Each backend is timed
``--repeats`` times on the same texts and the best run is kept (the machine is shared). Prints a
table, then one JSON object with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from embedder_throughput import corpus_chunks  # noqa: E402

from rag_assets.embedders.base import EmbedStats  # noqa: E402
from rag_assets.embedders.local import LocalEmbedder  # noqa: E402
from rag_assets.settings import LOCAL_BACKENDS  # noqa: E402


def bench(backend: str, texts: list[str], batch_size: int, cache: Path, repeats: int) -> tuple[dict, np.ndarray]:
    emb = LocalEmbedder(batch_size=batch_size, long_text="split", backend=backend, onnx_cache=cache)
    t0 = time.perf_counter()
    emb.embed(texts[:4], EmbedStats())  # export if needed, load, warm up
    load = time.perf_counter() - t0
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = emb.embed(texts, EmbedStats())
        best = min(best, time.perf_counter() - t0)
    assert out is not None and out.shape == (len(texts), emb.dims)
    row = {
        "backend": backend,
        "fingerprint": emb.fingerprint,
        "texts": len(texts),
        "batch_size": batch_size,
        "load_seconds": round(load, 2),
        "seconds": round(best, 3),
        "texts_per_s": round(len(texts) / best, 1),
        "onnx_file": str(emb.onnx_file) if emb.onnx_file else None,
        "onnx_mb": round(emb.onnx_file.stat().st_size / 1e6, 1) if emb.onnx_file else None,
    }
    emb.close()
    return row, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=300)
    ap.add_argument("--chars", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backend", action="append", choices=LOCAL_BACKENDS, help="repeatable; default all")
    ap.add_argument("--cache", type=Path, help="ONNX export cache (default: a fresh temporary folder)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    backends = args.backend or list(LOCAL_BACKENDS)
    if "torch" not in backends:
        backends.insert(0, "torch")  # the reference for the cosines
    texts = corpus_chunks(args.texts, args.chars)
    with tempfile.TemporaryDirectory(prefix="onnx-cache-") as tmp:
        cache = args.cache or Path(tmp)
        rows, vectors = [], {}
        for backend in backends:
            row, vectors[backend] = bench(backend, texts, args.batch_size, cache, args.repeats)
            rows.append(row)
    ref = vectors["torch"]
    torch_rate = rows[0]["texts_per_s"]
    for row in rows:
        cos = (vectors[row["backend"]] * ref).sum(axis=1)
        row["cosine_to_torch_mean"] = round(float(cos.mean()), 6)
        row["cosine_to_torch_min"] = round(float(cos.min()), 6)
        row["speedup"] = round(row["texts_per_s"] / torch_rate, 2)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None

    print(f"{'backend':<10} {'texts':>6} {'B':>4} {'load s':>7} {'sec':>7} {'chunks/s':>9} {'x torch':>8} "
          f"{'cos mean':>9} {'cos min':>9} {'MB':>6}")  # fmt: skip
    for r in rows:
        print(
            f"{r['backend']:<10} {r['texts']:>6} {r['batch_size']:>4} {r['load_seconds']:>7.2f} {r['seconds']:>7.2f} "
            f"{r['texts_per_s']:>9.1f} {r['speedup']:>8.2f} {r['cosine_to_torch_mean']:>9.5f} "
            f"{r['cosine_to_torch_min']:>9.5f} {r['onnx_mb'] if r['onnx_mb'] is not None else '-':>6}"
        )
    print(json.dumps({"cpus": os.cpu_count(), "loadavg_1m": load, "chars_per_text": args.chars, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
