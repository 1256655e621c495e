"""A deterministic, dependency-free embedder for tests, demos and benchmarks.

Feature hashing of lower-cased word tokens (sublinear term frequency, signed buckets, L2
normalised): texts that share words get similar vectors, so queries behave plausibly, and the same
text always gives bit-identical vectors on every machine, which the equivalence tests rely on.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Sequence

import numpy as np

from rag_assets.embedders.base import Embedder, EmbedStats, check_vectors

_TOKEN_RE = re.compile(r"\w+", re.UNICODE)
_VOCAB_LIMIT = 2_000_000


class HashingEmbedder(Embedder):
    provider = "hashing"
    model = "feature-hash-v1"
    normalize = True

    def __init__(self, dims: int = 256):
        if dims < 8:
            raise ValueError(f"hashing embedder needs at least 8 dimensions, got {dims}")
        self.dims = dims
        self._vocab: dict[str, int] = {}  # token -> signed bucket (bucket + 1, negated for sign)
        self._lock = threading.Lock()

    def _bucket(self, token: str) -> int:
        h = int.from_bytes(hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
        b = (h >> 1) % self.dims + 1
        return -b if h & 1 else b

    def embed_one(self, text: str) -> np.ndarray:
        vocab = self._vocab
        tokens = _TOKEN_RE.findall(text.lower())
        codes = []
        for tok in tokens:
            c = vocab.get(tok)
            if c is None:
                c = self._bucket(tok)
                with self._lock:
                    if len(vocab) >= _VOCAB_LIMIT:
                        vocab.clear()
                    vocab[tok] = c
            codes.append(c)
        vec = np.zeros(self.dims, dtype=np.float64)
        if codes:
            arr = np.fromiter(codes, dtype=np.int64, count=len(codes))
            idx = np.abs(arr) - 1
            counts = np.bincount(idx, weights=np.sign(arr).astype(np.float64), minlength=self.dims)
            vec = np.sign(counts) * np.log1p(np.abs(counts))
        norm = np.linalg.norm(vec)
        if norm == 0:
            vec[0] = 1.0  # the empty text still gets a valid unit vector
            norm = 1.0
        return (vec / norm).astype(np.float32)

    def embed(self, texts: Sequence[str], stats: EmbedStats, labels: Sequence[str] | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = self.embed_one(t)
        stats.add(texts=len(texts), seconds=time.perf_counter() - t0)  # tokens: counted by the caller
        return check_vectors(out, len(texts), self.dims, "hashing embedder")
