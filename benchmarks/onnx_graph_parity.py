"""The torch-free ONNX graph (rag_assets/embedders/bert_graph.py) against sentence-transformers.

Why: the graph is written by hand from the safetensors weights, so it must be shown to compute what the
torch model computes before it replaces ``torch.onnx.export``. Every chunk of samples/corpus (structure
chunker, 200-token chunks) that fits the model's 256 word pieces is embedded by the torch backend and by
the ONNX backends built from the hand-written graph; prints the cosine (mean and min) per backend, the
graph's build time, size and sha256, as a table and then one JSON object. Needs torch and
sentence-transformers for the reference (the 'local' extra).

    HF_HUB_OFFLINE=1 python benchmarks/onnx_graph_parity.py
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag_assets.chunking import make_chunker  # noqa: E402
from rag_assets.embedders.base import EmbedStats  # noqa: E402
from rag_assets.embedders.bert_graph import build_bert_onnx  # noqa: E402
from rag_assets.embedders.local import LocalEmbedder, packaged_model_path  # noqa: E402


def sample_chunks() -> list[str]:
    chunker = make_chunker("structure", max_tokens=200)
    texts = []
    for path in sorted((ROOT / "samples" / "corpus").rglob("*")):
        if path.suffix in (".md", ".rst"):
            texts.extend(c.text for c in chunker.chunk(path.read_text(encoding="utf-8")))
    return texts


def main() -> None:
    t0 = time.perf_counter()
    data = build_bert_onnx(packaged_model_path())
    build_s = time.perf_counter() - t0
    cache = Path(tempfile.mkdtemp(prefix="onnx-parity-"))
    chunks = sample_chunks()
    fp32 = LocalEmbedder(backend="onnx", onnx_cache=cache)
    texts = [t for t, n in zip(chunks, fp32.count_tokens(chunks), strict=True) if n <= 256]
    ref = LocalEmbedder(backend="torch", batch_size=16).embed(texts, EmbedStats())
    rows = []
    for backend in ("onnx", "onnx-int8"):
        got = LocalEmbedder(backend=backend, onnx_cache=cache).embed(texts, EmbedStats())
        cos = (got * ref).sum(axis=1)
        rows.append({"backend": backend, "cos_mean": float(cos.mean()), "cos_min": float(cos.min())})
    print(f"graph: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}, built in {build_s:.2f} s")
    print(f"chunks: {len(texts)} of {len(chunks)} fit 256 tokens")
    print(f"{'backend':<10} {'cos mean':>10} {'cos min':>10}")
    for r in rows:
        print(f"{r['backend']:<10} {r['cos_mean']:>10.7f} {r['cos_min']:>10.7f}")
    print(json.dumps({"graph_bytes": len(data), "graph_sha256": hashlib.sha256(data).hexdigest(),
                      "build_seconds": round(build_s, 3), "chunks": len(texts), "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
