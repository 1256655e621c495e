"""Test helpers: corpus generators and an embedder that records what reaches it.

The recording embedder wraps the real hashing embedder at the provider interface (the boundary
where a paid API would sit); storage and the network are never mocked.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from rag_assets.embedders.base import EmbedStats
from rag_assets.embedders.hashing import HashingEmbedder
from rag_assets.pipeline import Indexer
from rag_assets.settings import Settings

WORDS = [
    "index",
    "vector",
    "shard",
    "chunk",
    "embedding",
    "postgres",
    "query",
    "cache",
    "manifest",
    "document",
    "snapshot",
    "rollback",
    "webhook",
    "sensor",
    "backfill",
    "partition",
    "model",
    "token",
    "latency",
    "retry",
    "budget",
    "schema",
    "generation",
    "digest",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "with",
    "on",
    "by",
    "that",
    "this",
    "from",
    "as",
    "are",
    "be",
    "it",
    "or",
    "at",
]


class RecordingEmbedder(HashingEmbedder):
    """Hashing embedder that remembers every text it was asked to embed."""

    def __init__(self, dims: int = 32):
        super().__init__(dims)
        self.calls: list[list[str]] = []

    @property
    def texts(self) -> list[str]:
        return [t for c in self.calls for t in c]

    def embed(self, texts: Sequence[str], stats: EmbedStats, labels=None, *, purpose="passage") -> np.ndarray:
        self.calls.append(list(texts))
        return super().embed(texts, stats, labels, purpose=purpose)


class WrongDimEmbedder(HashingEmbedder):
    """Returns vectors one dimension too long: a provider that changed its model under us."""

    def embed(self, texts, stats, labels=None, *, purpose="passage"):
        v = super().embed(texts, stats, labels, purpose=purpose)
        return np.hstack([v, np.zeros((len(texts), 1), np.float32)])


def sentence(rng: random.Random, n: int | None = None) -> str:
    n = n or rng.randint(5, 18)
    s = " ".join(rng.choice(WORDS) for _ in range(n))
    return s[0].upper() + s[1:] + "."


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 7)))


def markdown_doc(rng: random.Random, sections: int | None = None) -> str:
    parts = [f"# {sentence(rng, 3)[:-1]}", ""]
    for _ in range(sections or rng.randint(1, 4)):
        parts += [f"## {sentence(rng, 2)[:-1]}", ""]
        for _ in range(rng.randint(1, 5)):
            parts += [paragraph(rng), ""]
    return "\n".join(parts)


def write(path: Path, text: str | bytes, mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def full_rebuild(settings: Settings, db_url: str, path: Path, dims: int = 32) -> Indexer:
    """A fresh database indexed from scratch: the reference every incremental state must equal."""
    idx = Indexer(replace(settings, database_url=db_url), embedder=HashingEmbedder(dims))
    idx.refresh(path, full=True)
    return idx
