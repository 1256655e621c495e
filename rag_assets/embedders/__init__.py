"""Embedding providers behind one interface (``Embedder``), chosen by ``RAG_EMBEDDER``."""

from __future__ import annotations

from rag_assets.embedders.base import (
    Embedder,
    EmbeddingDimensionError,
    EmbeddingError,
    EmbedStats,
    TextTooLongError,
)
from rag_assets.settings import Settings, SettingsError

__all__ = [
    "Embedder",
    "EmbedStats",
    "EmbeddingError",
    "EmbeddingDimensionError",
    "TextTooLongError",
    "make_embedder",
]


def make_embedder(settings: Settings) -> Embedder:
    """Build the configured provider. Imports are lazy so the hashing default needs nothing extra."""
    if settings.embedder == "hashing":
        from rag_assets.embedders.hashing import HashingEmbedder

        return HashingEmbedder(dims=settings.embedding_dimensions or 256)
    if settings.embedder == "openai":
        if not settings.embedding_api_key:
            raise SettingsError("RAG_EMBEDDER=openai needs RAG_EMBEDDING_API_KEY")
        from rag_assets.embedders.openai_compat import OpenAICompatEmbedder

        return OpenAICompatEmbedder.from_settings(settings)
    if settings.embedder == "local":
        from rag_assets.embedders.local import LocalEmbedder

        return LocalEmbedder.from_settings(settings)
    raise SettingsError(f"RAG_EMBEDDER={settings.embedder!r}: use 'hashing', 'openai' or 'local'")
