"""Asymmetric embedders (e5, bge, nomic; Cohere/Voyage/Jina input types): queries and passages are
sent differently, the difference is part of the fingerprint, and what is sent is what is counted.

The OpenAI-compatible client runs against tests/fake_openai.py on a real socket; the server records
every request body and answers with a deterministic vector of the text it received, so a test can
tell exactly which text (prefix included) was embedded.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from rag_assets.embedders import embedder_fingerprint, make_embedder
from rag_assets.embedders.asymmetric import InputStyle
from rag_assets.embedders.base import EmbedStats
from rag_assets.embedders.openai_compat import OpenAICompatEmbedder
from rag_assets.query import embed_query, search
from rag_assets.settings import Settings, SettingsError
from tests.fake_openai import FakeOpenAI, fake_token_count
from tests.helpers import markdown_doc, write

DIMS = 8
E5 = InputStyle(query_prefix="query: ", passage_prefix="passage: ")
COHERE = InputStyle(query_input_type="search_query", passage_input_type="search_document")
OPENAI = {"RAG_EMBEDDER": "openai", "RAG_EMBEDDING_API_KEY": "sk-unused", "RAG_EMBEDDING_DIMENSIONS": "8"}


def client(srv: FakeOpenAI, style: InputStyle, **kw) -> OpenAICompatEmbedder:
    kw.setdefault("tokenizer", "estimate")
    return OpenAICompatEmbedder(srv.url, "sk-test", "fake-embed", dimensions=DIMS, input_style=style, seed=1, **kw)


def test_prefixes_are_sent_with_each_text_and_the_vectors_are_those_of_what_was_sent():
    with FakeOpenAI(dims=DIMS) as srv:
        emb = client(srv, E5)
        stats = EmbedStats()
        out = emb.embed(["alpha beta", "gamma"], stats, labels=["d#0", "d#1"])
        q = emb.embed(["what is alpha?"], stats, labels=["query"], purpose="query")
        bodies = [r.body for r in srv.requests]
    assert bodies[0]["input"] == ["passage: alpha beta", "passage: gamma"]
    assert bodies[1]["input"] == ["query: what is alpha?"]
    assert "input_type" not in bodies[0] and "input_type" not in bodies[1]  # prefixes only: no extra field
    np.testing.assert_allclose(out[0], srv.vector("passage: alpha beta", model="fake-embed"), atol=1e-6)
    np.testing.assert_allclose(q[0], srv.vector("query: what is alpha?", model="fake-embed"), atol=1e-6)
    # the provider bills the prefixed texts, and the stats say so
    sent = ["passage: alpha beta", "passage: gamma", "query: what is alpha?"]
    assert stats.tokens == sum(fake_token_count(t) for t in sent)


def test_input_types_go_in_the_request_body_field_the_configuration_names():
    with FakeOpenAI(dims=DIMS) as srv:
        emb = client(srv, COHERE)
        emb.embed(["a chunk"], EmbedStats())
        emb.embed(["a question"], EmbedStats(), purpose="query")
        jina = client(srv, InputStyle(query_input_type="retrieval.query", passage_input_type="retrieval.passage",
                                      input_type_field="task"))
        jina.embed(["a chunk"], EmbedStats())
        plain = client(srv, InputStyle())
        plain.embed(["a chunk"], EmbedStats(), purpose="query")
        bodies = [r.body for r in srv.requests]
    assert bodies[0]["input_type"] == "search_document" and bodies[0]["input"] == ["a chunk"]
    assert bodies[1]["input_type"] == "search_query"
    assert bodies[2]["task"] == "retrieval.passage" and "input_type" not in bodies[2]
    assert set(bodies[3]) == {"model", "input", "encoding_format", "dimensions"}  # a symmetric model: as before


def test_a_split_text_sends_the_prefix_with_every_piece_and_each_piece_fits_with_it():
    rng = random.Random(3)
    long_text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(400))
    with FakeOpenAI(dims=DIMS) as srv:
        emb = client(srv, E5, max_input_tokens=120, long_text="split", batch_size=64)
        emb.embed([long_text], EmbedStats(), labels=["big#0"])
        pieces = [t for r in srv.requests for t in r.inputs]
    assert len(pieces) > 1
    assert all(p.startswith("passage: ") for p in pieces)
    assert all(emb.count_tokens([p])[0] <= 120 for p in pieces)  # the limit applies to prefix + piece
    assert "".join(p.removeprefix("passage: ") for p in pieces).split() == long_text.split()


def test_the_style_is_part_of_the_fingerprint_offline_and_running_alike():
    base = Settings.from_env(OPENAI)
    variants = [
        {"RAG_EMBEDDING_QUERY_PREFIX": "query: "},
        {"RAG_EMBEDDING_PASSAGE_PREFIX": "passage: "},
        {"RAG_EMBEDDING_QUERY_PREFIX": "query: ", "RAG_EMBEDDING_PASSAGE_PREFIX": "passage: "},
        {"RAG_EMBEDDING_QUERY_INPUT_TYPE": "search_query"},
        {"RAG_EMBEDDING_PASSAGE_INPUT_TYPE": "search_document"},
        {"RAG_EMBEDDING_PASSAGE_INPUT_TYPE": "search_document", "RAG_EMBEDDING_INPUT_TYPE_FIELD": "task"},
    ]
    seen = {embedder_fingerprint(base)}
    for extra in variants:
        s = Settings.from_env({**OPENAI, **extra})
        fp = embedder_fingerprint(s)
        emb = make_embedder(s)
        try:
            assert emb.fingerprint == fp  # what a code location reads equals what a run records
        finally:
            emb.close()
        seen.add(fp)
    assert len(seen) == len(variants) + 1  # every option changes it
    # the field name alone (no input type set) sends nothing, so it changes nothing
    assert embedder_fingerprint(Settings.from_env({**OPENAI, "RAG_EMBEDDING_INPUT_TYPE_FIELD": "task"})) == (
        embedder_fingerprint(base)
    )
    # local: prefixes count, offline (no torch import, no model load)
    local = embedder_fingerprint(Settings.from_env({"RAG_EMBEDDER": "local"}))
    e5_local = embedder_fingerprint(Settings.from_env({"RAG_EMBEDDER": "local", "RAG_EMBEDDING_PASSAGE_PREFIX": "passage: "}))
    assert local == "local:all-MiniLM-L6-v2:384:norm:8d3f57df5f81" and e5_local != local


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RAG_EMBEDDING_QUERY_PREFIX": "query: "}, "hashing embedder is symmetric"),
        ({"RAG_EMBEDDER": "local", "RAG_EMBEDDING_QUERY_INPUT_TYPE": "query"}, "RAG_EMBEDDING_QUERY_INPUT_TYPE"),
        ({**OPENAI, "RAG_EMBEDDING_PASSAGE_INPUT_TYPE": "x", "RAG_EMBEDDING_INPUT_TYPE_FIELD": "input"},
         "RAG_EMBEDDING_INPUT_TYPE_FIELD"),
        ({**OPENAI, "RAG_EMBEDDING_INPUT_TYPE_FIELD": "bad-name"}, "RAG_EMBEDDING_INPUT_TYPE_FIELD"),
        ({**OPENAI, "RAG_EMBEDDING_QUERY_PREFIX": "q" * 1001}, "RAG_EMBEDDING_QUERY_PREFIX"),
    ],
)
def test_unusable_styles_are_refused_naming_the_setting(env, match):
    with pytest.raises(SettingsError, match=match):
        Settings.from_env(env)


def test_an_index_built_with_passage_prefixes_is_queried_with_the_query_prefix(settings, docs_dir):
    """End to end: chunks are embedded (and cached) as passages, questions as queries; the cache
    keys on the style, so the same texts under a symmetric configuration are embedded again."""
    from dataclasses import replace

    from rag_assets.pipeline import Indexer

    rng = random.Random(8)
    for i in range(4):
        write(docs_dir / f"doc{i}.md", markdown_doc(rng, sections=2))
    with FakeOpenAI(dims=DIMS) as srv:
        s = replace(
            settings,
            embedder="openai",
            embedding_base_url=srv.url,
            embedding_api_key="sk-test",
            embedding_model="fake-embed",
            embedding_dimensions=DIMS,
            embedding_query_prefix="query: ",
            embedding_passage_prefix="passage: ",
            embedding_query_input_type="search_query",
            embedding_passage_input_type="search_document",
        )
        idx = Indexer(s, embedder=make_embedder(s))
        rep = idx.refresh(docs_dir)
        chunk_texts = {r[0] for r in idx.conn.execute("SELECT DISTINCT text FROM chunks")}
        sent = [(t, r.body["input_type"]) for r in srv.requests for t in r.inputs]
        assert {t for t, _ in sent} == {"passage: " + t for t in chunk_texts}
        assert {k for _, k in sent} == {"search_document"}
        assert rep.tokens_embedded == sum(fake_token_count("passage: " + t) for t in chunk_texts)

        question = next(iter(chunk_texts)).split(".")[0]
        srv.reset_counters()
        res = search(idx.conn, idx.embedder, question, 3, mode="vector")
        (req,) = srv.requests
        assert req.inputs == ["query: " + question] and req.body["input_type"] == "search_query"
        assert res.results and res.generation is not None
        np.testing.assert_allclose(
            embed_query(idx.embedder, question), srv.vector("query: " + question, model="fake-embed"), atol=1e-6
        )
        cached = idx.conn.execute("SELECT count(*) FROM rag_cache.embedding_cache").fetchone()[0]
        assert cached == len(chunk_texts)

        # the same chunks under a symmetric configuration: another fingerprint, embedded again
        plain = replace(s, embedding_query_prefix="", embedding_passage_prefix="",
                        embedding_query_input_type=None, embedding_passage_input_type=None)
        assert embedder_fingerprint(plain) != embedder_fingerprint(s)
        srv.reset_counters()
        idx2 = Indexer(plain, embedder=make_embedder(plain))
        idx2.refresh(docs_dir)
        assert {t for r in srv.requests for t in r.inputs} == chunk_texts
        idx.conn.close()
        idx2.conn.close()


@pytest.mark.model
def test_the_local_model_embeds_with_the_prefix_of_each_purpose():
    pytest.importorskip("sentence_transformers", reason="needs the 'local' extra (sentence-transformers)")
    from rag_assets.embedders.local import LocalEmbedder

    e5 = LocalEmbedder(input_style=E5)
    plain = LocalEmbedder()
    try:
        stats = EmbedStats()
        q = e5.embed(["what is a shard?"], stats, purpose="query")
        p = e5.embed(["a shard is a hash bucket"], stats)
        np.testing.assert_allclose(q, plain.embed(["query: what is a shard?"], EmbedStats()), atol=1e-5)
        np.testing.assert_allclose(p, plain.embed(["passage: a shard is a hash bucket"], EmbedStats()), atol=1e-5)
        assert stats.tokens == sum(plain.count_tokens(["query: what is a shard?", "passage: a shard is a hash bucket"]))
        assert e5.fingerprint != plain.fingerprint
        assert e5.fingerprint == embedder_fingerprint(
            Settings.from_env({"RAG_EMBEDDER": "local", "RAG_EMBEDDING_QUERY_PREFIX": "query: ",
                               "RAG_EMBEDDING_PASSAGE_PREFIX": "passage: "})
        )
    finally:
        e5.close()
        plain.close()
