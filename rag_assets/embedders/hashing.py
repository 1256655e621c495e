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

from rag_assets.embedders.base import Embedder, EmbedStats, check_vectors, fingerprint_of

_TOKEN_RE = re.compile(r"\w+", re.UNICODE)
_VOCAB_LIMIT = 2_000_000
DEFAULT_DIMS = 256


def _check_dims(dims: int) -> None:
    if dims < 8:
        raise ValueError(f"hashing embedder needs at least 8 dimensions, got {dims}")


class HashingEmbedder(Embedder):
    provider = "hashing"
    model = "feature-hash-v1"
    normalize = True

    def __init__(self, dims: int = DEFAULT_DIMS):
        _check_dims(dims)
        self.dims = dims
        self._vocab: dict[str, int] = {}  # token -> signed bucket (bucket + 1, negated for sign)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> HashingEmbedder:
        """From :class:`rag_assets.settings.Settings`: ``RAG_EMBEDDING_DIMENSIONS`` (256 when unset)."""
        return cls(dims=settings.embedding_dimensions or DEFAULT_DIMS)

    @classmethod
    def fingerprint_for(cls, dims: int) -> str:
        """The fingerprint of a hashing embedder of ``dims`` dimensions (nothing is built)."""
        _check_dims(dims)
        return fingerprint_of(cls.provider, cls.model, dims, cls.normalize, {})

    @classmethod
    def fingerprint_from_settings(cls, settings) -> str:
        """The fingerprint :meth:`from_settings` would record."""
        return cls.fingerprint_for(settings.embedding_dimensions or DEFAULT_DIMS)

    @property
    def fingerprint(self) -> str:
        return self.fingerprint_for(self.dims)

    def _bucket(self, token: str) -> int:
        h = int.from_bytes(
            hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big"
        )
        b = (h >> 1) % self.dims + 1
        return -b if h & 1 else b

    def _codes(self, text: str) -> list[int]:
        """Signed bucket codes of the text's tokens (dict lookups in C; misses hashed once)."""
        tokens = _TOKEN_RE.findall(text.lower())
        vocab = self._vocab
        codes = list(map(vocab.get, tokens))
        if None in codes:
            with self._lock:
                if len(vocab) >= _VOCAB_LIMIT:
                    vocab.clear()
                for i, c in enumerate(codes):
                    if c is None:
                        c = vocab.get(tokens[i])
                        if c is None:
                            c = vocab[tokens[i]] = self._bucket(tokens[i])
                        codes[i] = c
        return codes

    def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        """All texts at once: one bincount over (row, bucket) pairs instead of one per text."""
        n, d = len(texts), self.dims
        per_text = [self._codes(t) for t in texts]
        lengths = np.fromiter((len(c) for c in per_text), dtype=np.int64, count=n)
        flat = np.fromiter((c for cs in per_text for c in cs), dtype=np.int64, count=int(lengths.sum()))
        rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
        counts = np.bincount(
            rows * d + (np.abs(flat) - 1), weights=np.sign(flat).astype(np.float64), minlength=n * d
        )
        m = counts.reshape(n, d)
        m = np.sign(m) * np.log1p(np.abs(m))
        norms = np.linalg.norm(m, axis=1)
        empty = norms == 0
        m[empty, 0] = 1.0  # the empty text still gets a valid unit vector
        norms[empty] = 1.0
        return (m / norms[:, None]).astype(np.float32)

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed_many([text])[0]

    def embed(
        self,
        texts: Sequence[str],
        stats: EmbedStats,
        labels: Sequence[str] | None = None,
        *,
        purpose: str = "passage",  # symmetric: queries and passages are hashed alike
    ) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.embed_many(list(texts)) if texts else np.empty((0, self.dims), dtype=np.float32)
        stats.add(texts=len(texts), seconds=time.perf_counter() - t0)  # tokens: counted by the caller
        return check_vectors(out, len(texts), self.dims, "hashing embedder")
