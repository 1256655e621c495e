"""Embedder throughput: the OpenAI-compatible client against a fake server with fixed latency, and
the local all-MiniLM-L6-v2 model (if sentence-transformers is installed).

Why: with a provider whose every request takes L seconds, B inputs per request and C requests in
flight, no client can beat B*C/L texts per second. The client should get close to that bound
(target >= 80%): anything less means batching, threading, tokenising or JSON overhead is eating
the concurrency. The local row is chunks/s of the CPU (or GPU) model on realistic ~1,000-character
chunks of the sample corpus.

    python benchmarks/embedder_throughput.py                      # 5,000 texts, B=64, C=8, 200 ms
    python benchmarks/embedder_throughput.py --config 128x4 --config 64x8 --texts 10000
    python benchmarks/embedder_throughput.py --no-local

Prints a table, then one JSON object with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_openai import FakeOpenAI  # noqa: E402

from rag_assets.embedders.base import EmbedStats  # noqa: E402
from rag_assets.embedders.openai_compat import OpenAICompatEmbedder  # noqa: E402

_WORDS = (
    "index vector chunk embedding corpus document query retrieval postgres table asset partition "
    "cache model token batch request latency throughput pipeline schedule sensor snapshot shard "
    "the a of to and in is that for with as on by this be are from or it an at which can will "
    "configure deploy upgrade version release migrate schema column row transaction commit "
    "unique identifier content hash checksum incremental changed unchanged deleted renamed"
)
WORDS = _WORDS.split()


def synthetic_texts(n: int, chars: int, seed: int = 0) -> list[str]:
    """``n`` distinct English-like texts of about ``chars`` characters."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [f"Text {i}:"]
        length = len(words[0])
        while length < chars:
            w = rng.choice(WORDS)
            words.append(w)
            length += len(w) + 1
        out.append(" ".join(words)[:chars])
    return out


def corpus_chunks(n: int, chars: int) -> list[str]:
    """Up to ``n`` ~``chars``-character chunks of the sample corpus, cut at paragraph boundaries."""
    chunks: list[str] = []
    files = sorted(p for p in (ROOT / "samples" / "corpus").rglob("*") if p.is_file())
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        cur = ""
        for para in text.split("\n\n"):
            para = para.strip()[:chars]
            if not para:
                continue
            if cur and len(cur) + 2 + len(para) > chars:
                chunks.append(cur)
                cur = ""
                if len(chunks) >= n:
                    return chunks
            cur = f"{cur}\n\n{para}" if cur else para
        if cur and len(cur) >= chars // 2:
            chunks.append(cur)
            if len(chunks) >= n:
                return chunks
    if len(chunks) < n:
        chunks += synthetic_texts(n - len(chunks), chars, seed=1)
    return chunks


def _serve(conn, dims: int, latency: float) -> None:
    """Child process: run the fake server until told to stop, then report its counters."""
    with FakeOpenAI(dims=dims, latency_s=latency, constant_vectors=True) as srv:
        conn.send(srv.url)
        conn.recv()
        conn.send({"requests": srv.request_count, "max_in_flight": srv.max_in_flight})


class RemoteFake:
    """The fake server in its own process, so its work does not share the client's GIL (a real
    provider is on another machine)."""

    def __init__(self, dims: int, latency: float):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, dims, latency), daemon=True)

    def __enter__(self) -> RemoteFake:
        self._proc.start()
        self.url = self._conn.recv()
        return self

    def stop(self) -> dict:
        self._conn.send("stop")
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.terminate()


def bench_remote(
    n: int, chars: int, batch_size: int, concurrency: int, latency: float, dims: int, fmt: str
) -> dict:
    texts = synthetic_texts(n, chars)
    with RemoteFake(dims, latency) as srv:
        emb = OpenAICompatEmbedder(
            srv.url, "sk-bench", "text-embedding-3-small", dimensions=dims,
            batch_size=batch_size, concurrency=concurrency, batch_tokens=1_000_000, encoding_format=fmt,
        )  # fmt: skip
        emb.probe()  # tokenizer, HTTP client and a connection ready outside the timing
        stats = EmbedStats()
        t0 = time.perf_counter()
        out = emb.embed(texts, stats)
        wall = time.perf_counter() - t0
        emb.close()
        assert out.shape == (n, dims)
        max_in_flight = srv.stop()["max_in_flight"]
    bound = batch_size * concurrency / latency
    achieved = n / wall
    requests = math.ceil(n / batch_size)
    return {
        "row": f"openai-compat fake {int(latency * 1000)} ms, {dims}-d {fmt}",
        "encoding_format": fmt,
        "dims": dims,
        "texts": n,
        "chars_per_text": chars,
        "batch_size": batch_size,
        "concurrency": concurrency,
        "requests": stats.requests,
        "waves": math.ceil(requests / concurrency),
        "max_in_flight": max_in_flight,
        "seconds": round(wall, 3),
        "texts_per_s": round(achieved, 1),
        "bound_texts_per_s": round(bound, 1),
        "ratio": round(achieved / bound, 3),
        "latency_p50_ms": round(stats.percentile_ms(50) or 0, 1),
        "tokens": stats.tokens,
    }


def bench_local(n: int, chars: int, batch_size: int) -> dict | None:
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return None
    from rag_assets.embedders.local import LocalEmbedder

    texts = corpus_chunks(n, chars)
    emb = LocalEmbedder(batch_size=batch_size, long_text="split", backend="torch")  # benchmarks/local_backends.py: ONNX
    t0 = time.perf_counter()
    emb.embed(texts[:4], EmbedStats())  # load + warm up
    load = time.perf_counter() - t0
    tokens = emb.count_tokens(texts)
    stats = EmbedStats()
    t0 = time.perf_counter()
    out = emb.embed(texts, stats)
    wall = time.perf_counter() - t0
    assert out.shape == (len(texts), emb.dims)
    try:
        import torch

        device = str(next(emb._model.parameters()).device)  # type: ignore[union-attr]
        threads = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        device, threads = "?", 0
    return {
        "row": f"local all-MiniLM-L6-v2 ({device}, {threads} threads)",
        "texts": len(texts),
        "chars_per_text": round(sum(map(len, texts)) / len(texts)),
        "tokens_per_text": round(sum(tokens) / len(tokens), 1),
        "split_texts": sum(1 for t in tokens if t > emb.max_input_tokens),
        "batch_size": batch_size,
        "load_seconds": round(load, 2),
        "seconds": round(wall, 3),
        "texts_per_s": round(len(texts) / wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=5000)
    ap.add_argument("--chars", type=int, default=1000)
    ap.add_argument("--config", action="append", help="BxC, e.g. 64x8 (repeatable; default 64x8)")
    ap.add_argument("--latency", type=float, default=0.2, help="fake server latency per request, seconds")
    ap.add_argument("--dims", type=int, default=256, help="vector size the fake server returns")
    ap.add_argument(
        "--format",
        action="append",
        choices=["float", "base64"],
        help="encoding_format (repeatable; default float)",
    )
    ap.add_argument("--local-texts", type=int, default=300)
    ap.add_argument("--local-batch-size", type=int, default=32)
    ap.add_argument("--no-local", action="store_true")
    args = ap.parse_args(argv)

    rows = []
    for cfg in args.config or ["64x8"]:
        b, c = (int(x) for x in cfg.lower().split("x"))
        for fmt in args.format or ["float"]:
            rows.append(bench_remote(args.texts, args.chars, b, c, args.latency, args.dims, fmt))
    local = None if args.no_local else bench_local(args.local_texts, args.chars, args.local_batch_size)

    print(f"{'row':<44} {'texts':>6} {'B':>4} {'C':>3} {'sec':>7} {'texts/s':>9} {'bound/s':>9} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['row']:<44} {r['texts']:>6} {r['batch_size']:>4} {r['concurrency']:>3} {r['seconds']:>7.2f} "
            f"{r['texts_per_s']:>9.1f} {r['bound_texts_per_s']:>9.1f} {r['ratio']:>6.1%}"
        )
    if local is not None:
        print(
            f"{local['row']:<44} {local['texts']:>6} {local['batch_size']:>4} {'-':>3} {local['seconds']:>7.2f} "
            f"{local['texts_per_s']:>9.1f} {'-':>9} {'-':>6}"
        )
    elif not args.no_local:
        print("local all-MiniLM-L6-v2: skipped (sentence-transformers not installed)")
    print(json.dumps({"remote": rows, "local": local}, indent=2))
    return 0 if all(r["ratio"] >= 0.8 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
