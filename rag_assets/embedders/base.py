"""The one interface every embedding provider implements, and the run statistics they record.

The pipeline never talks to a provider directly: it hands the texts that missed the cache to
``Embedder.embed`` and gets back a float32 matrix, one row per text, in order. Providers raise
``EmbeddingError`` (with the document/chunk label of the offending text when there is one) rather
than return anything partial, so a failed batch can never be half-written.
"""

from __future__ import annotations

import hashlib
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


class EmbeddingError(RuntimeError):
    """An embedding call failed for good (after any retries). The message is safe to show: no secrets."""

    def __init__(self, message: str, *, label: str | None = None, status: int | None = None):
        super().__init__(message)
        self.label = label
        self.status = status


class EmbeddingDimensionError(EmbeddingError):
    """The provider returned vectors of the wrong size."""


class TextTooLongError(EmbeddingError):
    """A text exceeds the model's input limit and the long-text policy is 'error'."""


@dataclass
class EmbedStats:
    """What embedding cost in one run. Thread-safe ``add_*`` so concurrent batches can share one."""

    texts: int = 0
    tokens: int = 0
    requests: int = 0
    retries: int = 0
    throttled: int = 0  # HTTP 429 answers
    rate_limit_wait_s: float = 0.0  # time spent waiting on Retry-After and our own RPM/TPM budget
    seconds: float = 0.0  # wall time inside embed()
    # A request that timed out or was answered "batch too large" and was sent again as smaller
    # batches (each such split also counts as a retry).
    batch_splits: int = 0
    # The largest batch the endpoint was found to take, when that is below the configured batch size
    # (None: no limit met). The smallest one seen wins when stats are merged.
    batch_size_limit: int | None = None
    latencies_ms: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_request(self, latency_ms: float) -> None:
        with self._lock:
            self.requests += 1
            self.latencies_ms.append(latency_ms)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def note_batch_size_limit(self, size: int) -> None:
        """Record a learned batch size limit (the smallest one noted is kept)."""
        with self._lock:
            if self.batch_size_limit is None or size < self.batch_size_limit:
                self.batch_size_limit = size

    def merge(self, other: EmbedStats) -> None:
        with self._lock:
            self.texts += other.texts
            self.tokens += other.tokens
            self.requests += other.requests
            self.retries += other.retries
            self.throttled += other.throttled
            self.rate_limit_wait_s += other.rate_limit_wait_s
            self.seconds += other.seconds
            self.batch_splits += other.batch_splits
            if other.batch_size_limit is not None and (
                self.batch_size_limit is None or other.batch_size_limit < self.batch_size_limit
            ):
                self.batch_size_limit = other.batch_size_limit
            self.latencies_ms.extend(other.latencies_ms)

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        return float(np.percentile(np.asarray(self.latencies_ms), q))

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "texts": self.texts,
            "tokens": self.tokens,
            "requests": self.requests,
            "retries": self.retries,
            "throttled_429": self.throttled,
            "rate_limit_wait_s": round(self.rate_limit_wait_s, 4),
            "embed_seconds": round(self.seconds, 4),
            "batch_splits": self.batch_splits,
            "batch_size_limit": self.batch_size_limit,
            "latency_p50_ms": self.percentile_ms(50),
            "latency_p95_ms": self.percentile_ms(95),
        }


class Embedder(ABC):
    """An embedding provider.

    ``fingerprint`` is the identity of the vectors it produces: provider, model, dimensions,
    normalisation and any provider-visible option. It keys the embedding cache and is the
    ``code_version`` of the embeddings asset, so changing it re-embeds while changing a timeout
    (not part of the fingerprint) does not.
    """

    provider: str = "abstract"
    model: str = ""
    dims: int = 0
    normalize: bool = True
    max_input_tokens: int | None = None

    def fingerprint_options(self) -> dict[str, object]:
        """Provider-visible options that change the vectors (override to add some)."""
        return {}

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.provider, self.model, self.dims, self.normalize, self.fingerprint_options())

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts as the provider bills them (a conservative estimate when unknown)."""
        return [estimate_tokens(t) for t in texts]

    @abstractmethod
    def embed(
        self,
        texts: Sequence[str],
        stats: EmbedStats,
        labels: Sequence[str] | None = None,
        *,
        purpose: str = "passage",
    ) -> np.ndarray:
        """Embed ``texts``; return float32 ``(len(texts), dims)``. ``labels`` name each text in errors.

        ``purpose`` is ``"passage"`` (chunks to store: the pipeline) or ``"query"`` (a question:
        :func:`rag_assets.query.embed_query`); an asymmetric model embeds the two differently
        (:mod:`rag_assets.embedders.asymmetric`), a symmetric one ignores it."""

    @property
    def commit_group_size(self) -> int:
        """Texts per embed call whose vectors are committed together: the work a crash can lose."""
        batch = getattr(self, "batch_size", 0) or 0
        conc = getattr(self, "concurrency", 0) or 0
        return max(16, batch * conc * 2) if batch and conc else 2048

    def price_per_mtok(self) -> float:
        """USD per million input tokens (0 for local providers)."""
        return 0.0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or models."""


# The dimension a fingerprint names when the configuration leaves it to the provider (an unknown
# model without ``dimensions``): the size is learned at the first request, not known offline.
NATIVE_DIMS = "native"


def fingerprint_of(
    provider: str, model: str, dims: int | str, normalize: bool, options: Mapping[str, object]
) -> str:
    """The fingerprint string of an embedder configuration (a pure function: no model, no network).

    ``provider:model:dims:norm|raw:digest``, the digest covering every input, so two configurations
    that can give different vectors never share a fingerprint (and so never share cached vectors).
    This exact format is stored by existing indexes (embedding cache, generations, Dagster code
    versions): changing it would re-embed every index, so it must stay byte-identical.
    """
    spec = {"provider": provider, "model": model, "dims": dims, "normalize": normalize, "options": dict(options)}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"{provider}:{model}:{dims}:{'norm' if normalize else 'raw'}:{digest}"


def check_recorded_dims(fingerprint: str, recorded: int, dims: int) -> None:
    """Refuse to mix vector sizes under one fingerprint.

    A fingerprint naming "native" dimensions does not pin the size, so the size the provider
    actually returns (learned at the first request) is compared with the size the index recorded
    for that fingerprint; a provider that changed its model behind the same name must not write
    vectors of a new size next to the old ones.
    """
    if recorded != dims:
        raise EmbeddingDimensionError(
            f"embedder {fingerprint}: the provider now returns {dims}-dimensional vectors, but this index "
            f"recorded {recorded} for the same configuration (the model behind RAG_EMBEDDING_MODEL changed); "
            "set RAG_EMBEDDING_DIMENSIONS or another RAG_EMBEDDING_MODEL to build a new generation"
        )


def estimate_tokens(text: str) -> int:
    """A conservative token estimate (over-counts English BPE by ~10-30%) when no tokenizer is known."""
    return max(1, (len(text.encode("utf-8")) + 2) // 3)


def check_vectors(vectors: np.ndarray, n: int, dims: int, where: str) -> np.ndarray:
    """Validate a provider's output: ``n`` finite vectors of ``dims`` floats, else raise."""
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise EmbeddingError(f"{where}: expected {n} vectors, got shape {tuple(vectors.shape)}")
    if vectors.shape[1] != dims:
        raise EmbeddingDimensionError(
            f"{where}: expected vectors of dimension {dims}, got {vectors.shape[1]}"
        )
    if not np.all(np.isfinite(vectors)):
        raise EmbeddingError(f"{where}: response contains NaN or infinite values")
    return vectors.astype(np.float32, copy=False)
