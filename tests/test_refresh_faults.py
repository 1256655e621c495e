"""A whole refresh through the OpenAI provider while the API misbehaves (real HTTP, real PostgreSQL).

tests/test_openai_compat.py proves the client under each fault; this proves the refresh: it ends either
with every chunk embedded exactly once (each distinct chunk text answered correctly by the server once,
the index equal to a fault-free build) or with a clear error and nothing written for the shards it
touched, after which a fault-free run completes the work.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from rag_assets.embedders.openai_compat import OpenAICompatEmbedder
from rag_assets.pipeline import Indexer, IndexingError
from rag_assets.store.serving import index_digest
from tests.fake_openai import FakeOpenAI, Fault
from tests.helpers import markdown_doc, write

KEY = "sk-refresh-SECRET-91b2c3"
DIMS = 8


def embedder(srv: FakeOpenAI, **kw) -> OpenAICompatEmbedder:
    kw.setdefault("timeout_s", 1.0)
    kw.setdefault("backoff_base_s", 0.02)
    kw.setdefault("backoff_max_s", 0.1)
    kw.setdefault("batch_size", 8)
    kw.setdefault("concurrency", 3)
    kw.setdefault("seed", 3)
    kw.setdefault("dimensions", DIMS)  # known up front: no probe request before the refresh
    return OpenAICompatEmbedder(srv.url, KEY, "fake-embed", **kw)


@pytest.fixture
def corpus(docs_dir):
    rng = random.Random(21)
    for i in range(12):
        write(docs_dir / f"doc{i:02d}.md", markdown_doc(rng, sections=2))
    return docs_dir


def chunk_texts(idx: Indexer) -> list[str]:
    return [r[0] for r in idx.conn.execute("SELECT DISTINCT text FROM rag.chunks")]


def reference_digest(settings, make_db, corpus) -> str:
    with FakeOpenAI(dims=DIMS) as clean:
        ref = Indexer(replace(settings, database_url=make_db()), embedder=embedder(clean))
        ref.refresh(corpus)
        try:
            return index_digest(ref.conn)
        finally:
            ref.close()


RECOVERABLE = {
    "429 with Retry-After": [Fault.rate_limited(retry_after=0.3)],
    "500s": [Fault.server_error(500), Fault.server_error(503)],
    "hung response (timeout)": [Fault.hang(3.0)],
    "malformed JSON": [Fault.malformed()],
    "connection dropped": [Fault.drop()],
}


@pytest.mark.parametrize("faults", list(RECOVERABLE.values()), ids=list(RECOVERABLE))
def test_refresh_survives_recoverable_faults_and_embeds_each_chunk_once(settings, make_db, corpus, faults):
    expected = reference_digest(settings, make_db, corpus)
    with FakeOpenAI(dims=DIMS) as srv:
        srv.faults.extend(faults)
        idx = Indexer(settings, embedder=embedder(srv))
        rep = idx.refresh(corpus)
        texts = chunk_texts(idx)
        served = srv.served_counts()
        assert texts and all(served[t] == 1 for t in texts), {
            t[:30]: served[t] for t in texts if served[t] != 1
        }
        assert not srv.faults  # every injected fault was met
        assert srv.max_in_flight <= 3  # the configured concurrency, retries included
        assert rep.embedding["retries"] >= 1
        if faults[0].status == 429:
            assert rep.embedding["throttled_429"] == 1 and rep.embedding["rate_limit_wait_s"] >= 0.3
        assert index_digest(idx.conn) == expected
        again = idx.refresh(corpus)
        assert again.chunks_embedded == 0
        idx.close()


FATAL = {
    "401": (lambda: [Fault.unauthorized()] * 10, "401"),
    "wrong dimension": (lambda: [Fault.wrong_dims(DIMS + 1)] * 10, "dimension"),
    "too few vectors": (lambda: [Fault.too_few()] * 10, "expected 8 embeddings, got 7"),
}


@pytest.mark.parametrize("case", list(FATAL), ids=list(FATAL))
def test_refresh_fails_clearly_on_fatal_faults_and_writes_nothing(settings, make_db, corpus, case):
    make_faults, words = FATAL[case]
    expected = reference_digest(settings, make_db, corpus)
    with FakeOpenAI(dims=DIMS) as srv:
        srv.faults.extend(make_faults())
        idx = Indexer(settings, embedder=embedder(srv, concurrency=1))
        with pytest.raises(IndexingError) as err:
            idx.refresh(corpus)
        message = str(err.value)
        assert words in message.lower() and KEY not in message
        conn = idx.conn
        assert conn.execute("SELECT count(*) FROM rag.embedding_cache").fetchone()[0] == 0
        live = conn.execute("SELECT count(*) FROM rag.generations WHERE state = 'live'").fetchone()[0]
        assert live == 0  # no half-built index was switched in
        srv.faults.clear()
        rep = idx.refresh(corpus)  # the provider recovered: the next run completes the work
        assert rep.chunks_embedded == len(chunk_texts(idx))
        assert index_digest(idx.conn) == expected
        idx.close()


def test_fatal_fault_mid_run_keeps_finished_batches_and_the_next_run_embeds_only_the_rest(
    settings, make_db, corpus
):
    """Commit groups answered before the failure stay in the embedding cache (they were paid for); no serving
    row is written; the next run sends only the texts not cached. What a failure can cost twice is bounded
    by one commit group: the answered requests of the group it cut short (batch 4 x concurrency 1 gives
    groups of 16 texts: requests 0-3 are the first group, 4-5 the second, and request 5 fails)."""
    expected = reference_digest(settings, make_db, corpus)
    with FakeOpenAI(dims=DIMS) as srv:
        srv.rules.append(lambda n, inputs: Fault.unauthorized() if n >= 5 else None)  # the sixth request on
        idx = Indexer(settings, embedder=embedder(srv, concurrency=1, batch_size=4))
        with pytest.raises(IndexingError, match="401"):
            idx.refresh(corpus)
        conn = idx.conn
        assert embedder(srv, batch_size=4, concurrency=1).commit_group_size == 16
        cached = conn.execute("SELECT count(*) FROM rag.embedding_cache").fetchone()[0]
        assert len(chunk_texts(idx)) > 20 and cached == 16  # the first group; the second was cut short
        assert conn.execute("SELECT count(*) FROM rag.generations WHERE state = 'live'").fetchone()[0] == 0
        srv.rules.clear()
        rep = idx.refresh(corpus)
        texts = chunk_texts(idx)
        assert rep.chunks_embedded == len(texts) - cached and rep.chunks_reused >= cached
        served = srv.served_counts()
        assert all(served[t] >= 1 for t in texts)
        assert sum(served[t] - 1 for t in texts) == 4  # request 4 (answered, its group not committed)
        assert index_digest(idx.conn) == expected
        idx.close()
