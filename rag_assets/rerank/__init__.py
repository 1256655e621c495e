"""Optional second-stage reranking behind one interface (``Reranker``), chosen by ``RAG_RERANK``.

``off`` (the default), ``http`` (:mod:`rag_assets.rerank.http`: a Cohere/Jina/Voyage/TEI-style
``POST {base}/rerank``) or ``local`` (:mod:`rag_assets.rerank.local`: a sentence-transformers
cross-encoder). :func:`rag_assets.rerank.apply.rerank_result` applies one to a first-stage answer.
"""

from __future__ import annotations

from rag_assets.rerank.base import Reranker, RerankError, Scored
from rag_assets.settings import Settings, SettingsError

__all__ = ["Reranker", "RerankError", "Scored", "make_reranker"]


def make_reranker(settings: Settings) -> Reranker | None:
    """The configured reranker, or None for ``RAG_RERANK=off``. Nothing connects or loads yet."""
    if settings.rerank == "off":
        return None
    if settings.rerank == "http":
        from rag_assets.rerank.http import HttpReranker

        try:
            return HttpReranker.from_settings(settings)
        except ValueError as e:
            raise SettingsError(str(e)) from None
    if settings.rerank == "local":
        from rag_assets.rerank.local import CrossEncoderReranker

        return CrossEncoderReranker.from_settings(settings)
    raise SettingsError(f"RAG_RERANK={settings.rerank!r}: use off, http or local")
