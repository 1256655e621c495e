"""A whole refresh through the OpenAI provider while the API misbehaves (real HTTP, real PostgreSQL).

tests/test_openai_compat.py proves the client under each fault; this proves the refresh: it ends either
with every chunk embedded exactly once (each distinct chunk text answered correctly by the server once,
the index equal to a fault-free build) or with a clear error and nothing written for the shards it
touched, after which a fault-free run completes the work.
"""

from __future__ import annotations

import random
import time
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


@pytest.fixture
def wide_corpus(docs_dir):
    """About 90 chunks: many more batches than the workers send before a limit is learned."""
    rng = random.Random(22)
    for i in range(30):
        write(docs_dir / f"wide{i:02d}.md", markdown_doc(rng, sections=3))
    return docs_dir


def chunk_texts(idx: Indexer) -> list[str]:
    return [r[0] for r in idx.conn.execute("SELECT DISTINCT text FROM chunks")]


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
        assert conn.execute("SELECT count(*) FROM rag_cache.embedding_cache").fetchone()[0] == 0
        live = conn.execute("SELECT count(*) FROM generations WHERE state = 'live'").fetchone()[0]
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
        cached = conn.execute("SELECT count(*) FROM rag_cache.embedding_cache").fetchone()[0]
        assert len(chunk_texts(idx)) > 20 and cached == 16  # the first group; the second was cut short
        assert conn.execute("SELECT count(*) FROM generations WHERE state = 'live'").fetchone()[0] == 0
        srv.rules.clear()
        rep = idx.refresh(corpus)
        texts = chunk_texts(idx)
        assert rep.chunks_embedded == len(texts) - cached and rep.chunks_reused >= cached
        served = srv.served_counts()
        assert all(served[t] >= 1 for t in texts)
        assert sum(served[t] - 1 for t in texts) == 4  # request 4 (answered, its group not committed)
        assert index_digest(idx.conn) == expected
        idx.close()


# -- servers that cannot take the configured batch size ----------------------------------------------

SERVER_LIMITS = {
    "TEI 413 over 4 inputs": {"max_batch_size": 4},
    "TEI-style 422 over 4 inputs": {"max_batch_size": 4, "batch_limit_status": 422},
    "slow above 4 inputs (read timeout)": {"slow_above": 4, "slow_s": 5.0},
}


@pytest.mark.parametrize("limits", list(SERVER_LIMITS.values()), ids=list(SERVER_LIMITS))
def test_refresh_learns_the_batch_size_the_server_takes_and_keeps_it(settings, make_db, wide_corpus, limits):
    """Issue 16: a batch the server refuses for its size, or cannot answer within the timeout, is split
    (never re-sent unchanged until the retry budget runs out); the size that works is learned, reported
    in the run's embedding stats, and every later batch starts there, in this run and the next."""
    expected = reference_digest(settings, make_db, wide_corpus)
    with FakeOpenAI(dims=DIMS, **limits) as srv:
        idx = Indexer(settings, embedder=embedder(srv, batch_size=16, timeout_s=1.0))
        t0 = time.monotonic()
        rep = idx.refresh(wide_corpus)
        elapsed = time.monotonic() - t0
        texts = chunk_texts(idx)
        assert len(texts) > 3 * 16  # more batches than the 3 workers send before the limit is known
        served = srv.served_counts()
        assert all(served[t] == 1 for t in texts), {t[:30]: served[t] for t in texts if served[t] != 1}
        assert index_digest(idx.conn) == expected
        if "slow_above" not in limits:  # (the server keeps computing batches the client gave up on)
            assert srv.max_in_flight <= 3
        failed = [r for r in srv.requests if r.status != 200]
        assert failed and all(len(r.inputs) > 4 for r in failed)
        # Each worker meets the limit at most once per halving (16 -> 4 named, or 16 -> 8 -> 4).
        assert len(failed) <= 3 * (1 if "max_batch_size" in limits else 2)
        assert rep.embedding["batch_splits"] == len(failed) == rep.embedding["retries"]
        assert rep.embedding["batch_size_limit"] == 4
        assert sum(1 for r in srv.requests if r.status == 200) == -(-len(texts) // 4)
        assert elapsed < 20  # the old client re-sent the first batch for the whole 300 s budget, then failed

        # The next run (another embedder instance, same endpoint) starts at the learned size.
        srv.reset_counters()
        for i in range(3):
            write(wide_corpus / f"new{i}.md", markdown_doc(random.Random(100 + i), sections=3))
        again = Indexer(settings, embedder=embedder(srv, batch_size=16, timeout_s=1.0))
        rep2 = again.refresh(wide_corpus)
        assert rep2.chunks_embedded > 4
        assert srv.requests and all(r.status == 200 and len(r.inputs) <= 4 for r in srv.requests)
        assert rep2.embedding["batch_splits"] == 0 and rep2.embedding["batch_size_limit"] == 4
        again.close()
        idx.close()


def test_refresh_fails_naming_the_chunk_the_endpoint_and_the_timeout_when_one_text_is_too_slow(
    settings, corpus
):
    """Nothing is answered in time, not even one text: the refresh fails within the retry budget (plus a
    timeout) with the cause on its message, and writes nothing."""
    with FakeOpenAI(dims=DIMS, slow_above=0, slow_s=5.0) as srv:
        idx = Indexer(
            settings, embedder=embedder(srv, batch_size=4, concurrency=1, timeout_s=0.3, max_retry_s=1.0)
        )
        t0 = time.monotonic()
        with pytest.raises(IndexingError) as err:
            idx.refresh(corpus)
        assert time.monotonic() - t0 < 1.0 + 2 * 0.3 + 1.0
        message = str(err.value)
        assert f"{srv.url}/embeddings" in message and "timed out after 0.3s" in message
        assert "alone was not answered within 0.3s" in message and "RAG_EMBEDDING_TIMEOUT_S" in message
        assert ".md#" in message  # the chunk's label: document and position
        assert KEY not in message
        assert idx.conn.execute("SELECT count(*) FROM rag_cache.embedding_cache").fetchone()[0] == 0
        idx.close()


def _dagster_settings(settings, srv: FakeOpenAI, monkeypatch, tmp_path, **kw):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)
    monkeypatch.setenv(
        "RAG_EMBEDDING_API_KEY", KEY
    )  # as for `rag-assets index`: the key comes from the environment
    return replace(
        settings,
        embedder="openai",
        embedding_base_url=srv.url,
        embedding_api_key=KEY,
        embedding_model="fake-embed",
        embedding_dimensions=DIMS,
        embedding_concurrency=3,
        **kw,
    )


def test_default_path_through_dagster_learns_the_batch_size(settings, make_db, corpus, monkeypatch, tmp_path):
    """The path the issue was met on: ``rag-assets index`` materializes through Dagster, the embedder
    built from RAG_EMBEDDING_* settings, against a server that cannot answer more than 4 inputs within
    the 1 s timeout. It completes, equal to a clean build, and the run's stats carry the learned size."""
    from rag_assets.defs.runner import index_via_dagster

    expected = reference_digest(settings, make_db, corpus)
    with FakeOpenAI(dims=DIMS, slow_above=4, slow_s=5.0) as srv:
        s = _dagster_settings(
            settings, srv, monkeypatch, tmp_path, embedding_batch_size=16, embedding_timeout_s=1.0
        )
        rep = index_via_dagster(s, corpus)
        idx = Indexer(s)
        try:
            texts = chunk_texts(idx)
            served = srv.served_counts()
            assert texts and all(served[t] == 1 for t in texts)
            assert index_digest(idx.conn) == expected
        finally:
            idx.close()
        assert rep.chunks_embedded == len(texts)
        assert rep.embedding["batch_splits"] >= 1 and rep.embedding["batch_size_limit"] == 4


def test_default_path_failure_names_the_cause(settings, corpus, monkeypatch, tmp_path):
    """Issue 16's last line was Dagster's 'Error occurred while executing op "embeddings":' and no cause.
    It must name the endpoint, what went wrong and the setting to raise."""
    from rag_assets.defs.runner import index_via_dagster

    with FakeOpenAI(dims=DIMS, slow_above=0, slow_s=5.0) as srv:
        s = _dagster_settings(
            settings,
            srv,
            monkeypatch,
            tmp_path,
            embedding_batch_size=4,
            embedding_timeout_s=0.3,
            embedding_max_retry_s=1.0,
        )
        with pytest.raises(IndexingError) as err:
            index_via_dagster(s, corpus)
        message = str(err.value)
        assert "Error occurred while executing" not in message
        assert f"{srv.url}/embeddings" in message and "timed out after 0.3s" in message
        assert "RAG_EMBEDDING_TIMEOUT_S (now 0.3)" in message and ".md#" in message
        assert KEY not in message
