"""Embedding providers behind one interface (``Embedder``), chosen by ``RAG_EMBEDDER``.

:func:`make_embedder` builds the configured provider (nothing connects or loads until the first
embed call); :func:`embedder_fingerprint` gives the fingerprint it will record without building it,
so loading a Dagster code location needs no secret, no network and no model.
"""

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
    "embedder_fingerprint",
    "legacy_fingerprint",
    "make_embedder",
]


def _unknown(settings: Settings) -> SettingsError:
    return SettingsError(f"RAG_EMBEDDER={settings.embedder!r}: use 'hashing', 'openai' or 'local'")


def make_embedder(settings: Settings) -> Embedder:
    """Build the configured provider. Imports are lazy so the hashing default needs nothing extra."""
    if settings.embedder == "hashing":
        from rag_assets.embedders.hashing import HashingEmbedder

        return HashingEmbedder.from_settings(settings)
    if settings.embedder == "openai":
        if not settings.embedding_api_key:
            raise SettingsError("RAG_EMBEDDER=openai needs RAG_EMBEDDING_API_KEY")
        from rag_assets.embedders.openai_compat import OpenAICompatEmbedder

        return OpenAICompatEmbedder.from_settings(settings)
    if settings.embedder == "local":
        from rag_assets.embedders.local import LocalEmbedder

        return LocalEmbedder.from_settings(settings)
    raise _unknown(settings)


def embedder_fingerprint(settings: Settings) -> str:
    """The fingerprint ``make_embedder(settings).fingerprint`` records, as a pure function of ``settings``.

    Opens no connection, needs no API key, imports no torch and loads no model: this is what a code
    location reads at load time (the embeddings' ``code_version``). An OpenAI-compatible model whose
    size is neither configured (``RAG_EMBEDDING_DIMENSIONS``) nor known gets "native" in place of
    the size; the running embedder learns the size at its first request and checks every answer.
    Raises ``ValueError`` (``SettingsError`` for an unknown ``RAG_EMBEDDER``) for a configuration
    the embedder itself would refuse.
    """
    if settings.embedder == "hashing":
        from rag_assets.embedders.hashing import HashingEmbedder

        return HashingEmbedder.fingerprint_from_settings(settings)
    if settings.embedder == "openai":
        from rag_assets.embedders.openai_compat import OpenAICompatEmbedder

        return OpenAICompatEmbedder.fingerprint_from_settings(settings)
    if settings.embedder == "local":
        from rag_assets.embedders.local import LocalEmbedder

        return LocalEmbedder.fingerprint_from_settings(settings)
    raise _unknown(settings)


def legacy_fingerprint(settings: Settings, dims: int) -> str | None:
    """The fingerprint earlier versions recorded for ``settings`` once the provider answered with
    ``dims``-dimensional vectors, when it differs from :func:`embedder_fingerprint`; else None.

    Only an OpenAI-compatible model of unknown size without ``RAG_EMBEDDING_DIMENSIONS`` differs:
    earlier versions probed the API at load time and put the size in the fingerprint, which is
    now "native". An index that stored the old string can adopt its cached vectors by renaming
    that embedder row to the new fingerprint (same vectors: same model, same size).
    """
    if settings.embedder != "openai" or settings.embedding_dimensions:
        return None
    from rag_assets.embedders.asymmetric import InputStyle

    if not InputStyle.from_settings(settings).is_symmetric:
        return None  # earlier versions had no query/passage options: nothing to adopt
    from rag_assets.embedders.base import fingerprint_of
    from rag_assets.embedders.openai_compat import OpenAICompatEmbedder
    from rag_assets.embedders.openai_protocol import DEFAULT_MODEL, native_dims

    model = settings.embedding_model or DEFAULT_MODEL
    if native_dims(model) is not None:
        return None
    return fingerprint_of(OpenAICompatEmbedder.provider, model, dims, OpenAICompatEmbedder.normalize, {})
