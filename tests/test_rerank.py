"""The rerank step: the HTTP client against a real rerank server on 127.0.0.1 with injected faults
(tests/fake_rerank.py), and the second stage over real retrieval (PostgreSQL from the conftest) in
the query function, the evaluation, the query API and the settings."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace

import httpx
import pytest

from rag_assets.query import candidate_depth, search
from rag_assets.rerank import RerankError, make_reranker
from rag_assets.rerank.apply import rerank_result
from rag_assets.rerank.base import best_first
from rag_assets.rerank.http import HttpReranker
from rag_assets.settings import Settings, SettingsError
from tests.fake_rerank import FakeRerank, RerankFault, fake_relevance
from tests.helpers import RecordingEmbedder, paragraph, write

KEY = "rk-test-SECRET-4471"
DOCS = [
    "postgres stores the vectors",
    "the cat sat on the mat",
    "rerank the vectors with a cross encoder model",
    "cross encoder",
    "nothing relevant here at all",
]
QUERY = "cross encoder rerank vectors"


def reranker(srv: FakeRerank, **kw) -> HttpReranker:
    kw.setdefault("timeout_s", 1.0)
    kw.setdefault("max_retry_s", 3.0)
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("seed", 1)
    return HttpReranker(srv.url, kw.pop("model", "fake-rerank"), kw.pop("api_key", KEY), **kw)


def expected(query: str, docs: list[str], top_n: int) -> list[int]:
    return [s.index for s in best_first([fake_relevance(query, d) for d in docs], top_n)]


# -- the HTTP client -------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["cohere", "voyage", "tei"])
def test_each_api_shape_is_sent_and_read(api):
    with FakeRerank() as srv:
        out = reranker(srv, api=api, model=None if api == "tei" else "fake-rerank").rerank(QUERY, DOCS, 3)
        (req,) = srv.requests
    assert [s.index for s in out] == expected(QUERY, DOCS, 3)
    assert [s.score for s in out] == sorted((s.score for s in out), reverse=True)
    assert req.path == "/v1/rerank" and req.authorization == f"Bearer {KEY}"
    if api == "tei":
        assert req.body == {"query": QUERY, "texts": DOCS, "truncate": True}
    elif api == "voyage":
        assert req.body == {"model": "fake-rerank", "query": QUERY, "documents": DOCS, "top_k": 3, "truncation": True}
    else:
        assert req.body == {"model": "fake-rerank", "query": QUERY, "documents": DOCS, "top_n": 3}


def test_a_500_then_success_is_retried():
    with FakeRerank() as srv:
        srv.faults.extend([RerankFault.status_(500), RerankFault.status_(503)])
        out = reranker(srv).rerank(QUERY, DOCS, 2)
        assert [r.status for r in srv.requests] == [500, 503, 200]
    assert [s.index for s in out] == expected(QUERY, DOCS, 2)


@pytest.mark.parametrize("retry_after", ["0.4", "date:1"])
def test_a_429_waits_at_least_retry_after(retry_after):
    wait = 0.4 if retry_after == "0.4" else 0.0  # an HTTP date has one-second resolution: only "after" holds
    with FakeRerank() as srv:
        srv.faults.append(RerankFault.status_(429, retry_after=retry_after))
        out = reranker(srv).rerank(QUERY, DOCS, 2)
        first, second = srv.requests
    assert second.t - first.t >= wait and [first.status, second.status] == [429, 200]
    assert [s.index for s in out] == expected(QUERY, DOCS, 2)


def test_a_retry_after_beyond_the_budget_fails_at_once_naming_the_endpoint():
    with FakeRerank() as srv:
        srv.faults.append(RerankFault.status_(429, retry_after=30))
        t0 = time.monotonic()
        with pytest.raises(RerankError, match=r"127\.0\.0\.1:\d+/v1/rerank.*retry after 30.0s.*RAG_RERANK_MAX_RETRY_S"):
            reranker(srv, max_retry_s=2.0).rerank(QUERY, DOCS, 2)
        assert time.monotonic() - t0 < 1.0 and len(srv.requests) == 1


def test_malformed_json_is_retried_a_bounded_number_of_times():
    with FakeRerank() as srv:
        srv.faults.append(RerankFault.malformed())
        assert [s.index for s in reranker(srv).rerank(QUERY, DOCS, 2)] == expected(QUERY, DOCS, 2)
        srv.faults.extend([RerankFault.malformed(), RerankFault.malformed()])
        with pytest.raises(RerankError, match="not JSON.*after 2 malformed answers"):
            reranker(srv).rerank(QUERY, DOCS, 2)
        assert len(srv.requests) == 4


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        (RerankFault.out_of_range(), "is not one of the 5 documents sent"),
        (RerankFault.duplicate(), "scored twice"),
        (RerankFault.too_few(), "2 results for 5 documents"),
    ],
)
def test_wrong_indices_fail_at_once(fault, match):
    with FakeRerank() as srv:
        srv.faults.append(fault)
        with pytest.raises(RerankError, match=rf"127\.0\.0\.1:\d+/v1/rerank.*{match}"):
            reranker(srv).rerank(QUERY, DOCS, 3)
        assert len(srv.requests) == 1  # a deterministic model would answer the same again


def test_a_timeout_is_retried_and_the_query_gives_up_within_the_budget():
    with FakeRerank() as srv:
        srv.faults.append(RerankFault.hang(1.0))
        out = reranker(srv, timeout_s=0.3).rerank(QUERY, DOCS, 2)  # the first attempt times out, the second answers
        assert [s.index for s in out] == expected(QUERY, DOCS, 2) and len(srv.requests) == 2
        srv.faults.extend([RerankFault.hang(2.0)] * 10)
        t0 = time.monotonic()
        with pytest.raises(RerankError, match=r"no answer within 0.3s.*RAG_RERANK_TIMEOUT_S"):
            reranker(srv, timeout_s=0.3, max_retry_s=1.0).rerank(QUERY, DOCS, 2)
        assert time.monotonic() - t0 < 1.0 + 0.3 + 0.5  # the budget plus one timeout (plus slack)


def test_a_refused_key_fails_at_once_and_the_key_is_never_shown():
    with FakeRerank(api_key="the-right-key") as srv:
        with pytest.raises(RerankError) as e:
            reranker(srv).rerank(QUERY, DOCS, 2)
        assert len(srv.requests) == 1
    assert "HTTP 401" in str(e.value) and KEY not in str(e.value) and "[REDACTED]" in str(e.value)
    assert e.value.status == 401


def test_an_unreachable_endpoint_fails_naming_it():
    with FakeRerank() as srv:
        url = srv.url
    with pytest.raises(RerankError, match=r"127\.0\.0\.1:\d+/v1/rerank.*connection error"):
        HttpReranker(url, "m", timeout_s=0.5, max_retry_s=0.3, backoff_base_s=0.01).rerank(QUERY, DOCS, 2)


def test_userinfo_and_query_never_reach_the_shown_endpoint():
    r = HttpReranker("https://user:pw@rerank.example/v2?key=abc", "m")
    assert r.url == "https://user:pw@rerank.example/v2/rerank?key=abc"
    assert r.endpoint == "https://rerank.example/v2/rerank" and "pw" not in r.name and "abc" not in r.name


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RAG_RERANK": "yes"}, "RAG_RERANK='yes'"),
        ({"RAG_RERANK": "http"}, "RAG_RERANK_URL"),
        ({"RAG_RERANK": "http", "RAG_RERANK_URL": "ftp://x"}, "RAG_RERANK_URL"),
        ({"RAG_RERANK": "http", "RAG_RERANK_URL": "http://x"}, "RAG_RERANK_MODEL"),
        ({"RAG_RERANK": "local"}, "RAG_RERANK_MODEL"),
        ({"RAG_RERANK_DEPTH": "0"}, "RAG_RERANK_DEPTH"),
        ({"RAG_RERANK_ON_ERROR": "ignore"}, "RAG_RERANK_ON_ERROR"),
        ({"RAG_RERANK_API": "openai"}, "RAG_RERANK_API"),
        ({"RAG_RERANK_TIMEOUT_S": "0"}, "RAG_RERANK_TIMEOUT_S"),
    ],
)
def test_bad_rerank_settings_name_the_setting(env, match):
    with pytest.raises(SettingsError, match=match):
        Settings.from_env(env)


def test_rerank_is_off_by_default_and_the_key_comes_from_its_variable():
    assert Settings.from_env({}).rerank == "off" and make_reranker(Settings.from_env({})) is None
    s = Settings.from_env({"RAG_RERANK": "tei" and "http", "RAG_RERANK_URL": "http://127.0.0.1:9/v1",
                           "RAG_RERANK_API": "tei"})
    s = replace(s, rerank_api_key_env="HANDBOOK_RERANK_KEY").with_secrets({"HANDBOOK_RERANK_KEY": "k-123"})
    assert s.rerank_api_key == "k-123" and s.public_dict()["rerank_api_key"] == "***"
    assert "k-123" not in repr(s) and s.without_secrets().rerank_api_key is None


# -- the second stage over real retrieval ----------------------------------------------------------


def _corpus(docs_dir) -> None:
    rng = random.Random(11)
    for i in range(14):
        write(docs_dir / f"d{i:02d}.md", f"# Note {i}\n\n{paragraph(rng)}\n\n{paragraph(rng)}\n")
    write(docs_dir / "target.md", "# Target\n\nThe reranker reads the question and the passage together.\n")


@pytest.fixture
def indexed(settings, docs_dir):
    from rag_assets.pipeline import Indexer

    _corpus(docs_dir)
    idx = Indexer(settings, embedder=RecordingEmbedder(32))
    idx.refresh(docs_dir)
    yield idx
    idx.conn.close()


@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
def test_search_reranks_the_first_stage_candidates_in_every_mode(indexed, mode):
    question = "the reranker reads the question and the passage"
    first = search(indexed.conn, indexed.embedder, question, 12, mode=mode)
    with FakeRerank() as srv:
        rr = reranker(srv)
        res = search(indexed.conn, indexed.embedder, question, 4, mode=mode, reranker=rr, rerank_depth=12)
        (req,) = srv.requests
    # the reranker saw the first stage's 12 candidates, in its order, and picked the best 4 of them
    n = min(4, len(first.results))  # keyword: only the chunks holding a word of the question
    assert req.body["documents"] == [h.text for h in first.results] and req.body["top_n"] == n
    texts = [h.text for h in first.results]
    assert [h.chunk_id for h in res.results] == [first.results[i].chunk_id for i in expected(question, texts, n)]
    assert res.results[0].doc_id == "target.md"
    assert [h.score for h in res.results] == [round(fake_relevance(question, h.text), 6) for h in res.results]
    assert res.rerank is not None and res.rerank.applied and res.rerank.candidates == len(first.results)
    assert res.as_dict()["rerank"]["reranker"].startswith("http:fake-rerank@127.0.0.1")
    assert res.generation == first.generation


def test_a_failed_reranker_falls_back_to_the_first_stage_order_flagged_or_fails_when_asked(indexed):
    question = "the reranker reads the question"
    first = search(indexed.conn, indexed.embedder, question, 3, mode="hybrid")
    with FakeRerank() as srv:
        srv.faults.extend([RerankFault.status_(503)] * 50)
        rr = reranker(srv, max_retry_s=0.2)
        res = search(indexed.conn, indexed.embedder, question, 3, mode="hybrid", reranker=rr)
        assert [h.chunk_id for h in res.results] == [h.chunk_id for h in first.results]
        assert [h.score for h in res.results] == [h.score for h in first.results]
        assert res.rerank is not None and not res.rerank.applied and "HTTP 503" in res.rerank.error
        assert "/v1/rerank" in res.as_dict()["rerank"]["error"]
        with pytest.raises(RerankError, match="/v1/rerank"):
            search(indexed.conn, indexed.embedder, question, 3, mode="hybrid", reranker=rr, rerank_on_error="fail")


def test_depth_bounds_and_an_empty_first_stage():
    assert candidate_depth(5, 50) == 50 and candidate_depth(80, 50) == 80 and candidate_depth(10, 5000) == 1000
    from rag_assets.query import QueryResult

    with FakeRerank() as srv:
        out = rerank_result(reranker(srv), "q", QueryResult([], 3), 5)
        assert out.results == [] and out.rerank.applied and srv.requests == []  # nothing to send


def test_eval_with_rerank_records_it_and_a_failure_fails_the_evaluation(indexed, settings, tmp_path):
    from rag_assets.eval import evaluate
    from rag_assets.eval.questions import load_questions
    from rag_assets.eval.run import EvalError

    qs = tmp_path / "q.jsonl"
    qs.write_text(
        json.dumps({"id": "q1", "question": "the reranker reads the question and the passage",
                    "relevant_docs": ["target.md"], "split": "dev"}) + "\n"
    )
    questions = load_questions(qs)
    settings = replace(settings, embedding_dimensions=32)  # the index's embedder (RecordingEmbedder(32))
    with FakeRerank() as srv:
        s = replace(settings, rerank="http", rerank_url=srv.url, rerank_model="fake-rerank", rerank_depth=30)
        rep = evaluate(s, questions, k=3, mode="vector", rerank=True)
        assert rep.rerank.startswith("http:fake-rerank") and rep.rerank_depth == 30
        assert rep.results[0].ranked_docs[0] == "target.md" and rep.docs.mrr == 1.0
        (req,) = srv.requests
        assert len(req.body["documents"]) == min(30, len(req.body["documents"])) and req.body["top_n"] == 15
        srv.faults.append(RerankFault.out_of_range())
        with pytest.raises(EvalError, match="q1.*not one of"):
            evaluate(s, questions, k=3, mode="vector", rerank=True)
    with pytest.raises(EvalError, match="RAG_RERANK=off"):
        evaluate(settings, questions, k=3, rerank=True)


def test_query_api_reranks_by_default_when_configured_and_on_request(settings, docs_dir):
    from rag_assets.pipeline import Indexer
    from rag_assets.service.app import create_app
    from tests.service_utils import ThreadServer, new_secret

    _corpus(docs_dir)
    idx = Indexer(settings, embedder=RecordingEmbedder(32))
    idx.refresh(docs_dir)
    idx.conn.close()
    question = {"text": "the reranker reads the question and the passage", "k": 3, "mode": "vector"}
    with FakeRerank() as srv:
        s = replace(settings, webhook_secret=new_secret(), rerank="http", rerank_url=srv.url,
                    rerank_model="fake-rerank", rerank_depth=10, rerank_max_retry_s=0.3)
        with ThreadServer(create_app(s, embedder=RecordingEmbedder(32))) as app, httpx.Client(base_url=app.url) as c:
            on = c.post("/query", json=question).json()
            off = c.post("/query", json={**question, "rerank": False}).json()
            assert len(srv.requests) == 1 and len(srv.requests[0].body["documents"]) == 10
            assert on["rerank"]["applied"] and on["results"][0]["doc_id"] == "target.md"
            assert "rerank" not in off and len(off["results"]) == 3
            assert c.post("/query", json={**question, "rerank": "yes"}).status_code == 400
            srv.faults.extend([RerankFault.status_(500)] * 100)
            fell = c.post("/query", json=question).json()
            assert not fell["rerank"]["applied"] and [h["chunk_id"] for h in fell["results"]] == [
                h["chunk_id"] for h in off["results"]
            ]
            assert 'rag_rerank_fallbacks_total 1.0' in c.get("/metrics").text
        strict = replace(s, rerank_on_error="fail", rerank_max_retry_s=0.2)
        with ThreadServer(create_app(strict, embedder=RecordingEmbedder(32))) as app, httpx.Client(base_url=app.url) as c:
            r = c.post("/query", json=question)
            assert r.status_code == 502 and "reranker failed" in r.json()["error"] and "/v1/rerank" in r.json()["error"]
    plain = replace(settings, webhook_secret=new_secret())
    with ThreadServer(create_app(plain, embedder=RecordingEmbedder(32))) as app, httpx.Client(base_url=app.url) as c:
        r = c.post("/query", json={**question, "rerank": True})
        assert r.status_code == 400 and "RAG_RERANK=off" in r.json()["error"]
        assert "rerank" not in c.post("/query", json=question).json()


def test_cli_query_and_eval_take_rerank(db_url, tmp_path):
    """`rag-assets query/eval --rerank http` as subprocesses: reranked, flagged fallback, strict failure."""
    import os
    import subprocess
    import sys

    docs = tmp_path / "docs"
    _corpus(docs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env.update(RAG_HOME=str(tmp_path / "home"), RAG_DATABASE_URL=db_url, RAG_SHARDS="8")

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rag_assets.cli", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=300)

    assert cli("index", str(docs), "--core", "--json").returncode == 0
    question = "the reranker reads the question and the passage"
    bad = cli("query", question, "--rerank", "http")
    assert bad.returncode == 2 and "RAG_RERANK_URL" in bad.stderr
    with FakeRerank() as srv:
        conf = {"RAG_RERANK_URL": srv.url, "RAG_RERANK_MODEL": "fake-rerank", "RAG_RERANK_DEPTH": "10"}
        p = cli("query", question, "-k", "3", "--rerank", "http", "--json", **conf)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["rerank"]["applied"] and out["results"][0]["doc_id"] == "target.md"
        assert len(srv.requests[0].body["documents"]) == 10  # RAG_RERANK_DEPTH
        qs = tmp_path / "q.jsonl"
        qs.write_text(json.dumps({"id": "q1", "question": question, "relevant_docs": ["target.md"], "split": "dev"}) + "\n")
        ev = cli("eval", str(qs), "-k", "3", "--rerank", "http", "--json", **conf)
        assert ev.returncode == 0, ev.stderr
        assert json.loads(ev.stdout)["rerank"].startswith("http:fake-rerank")
        url = srv.url
    gone = {"RAG_RERANK_URL": url, "RAG_RERANK_MODEL": "fake-rerank", "RAG_RERANK_MAX_RETRY_S": "0.2"}
    fb = cli("query", question, "-k", "3", "--rerank", "http", "--json", **gone)
    assert fb.returncode == 0 and not json.loads(fb.stdout)["rerank"]["applied"]
    assert "warning: not reranked" in fb.stderr and "/v1/rerank" in fb.stderr
    strict = cli("query", question, "--rerank", "http", **gone, RAG_RERANK_ON_ERROR="fail")
    assert strict.returncode == 5 and "/v1/rerank" in strict.stderr and "connection error" in strict.stderr


@pytest.mark.parametrize("mode", [None, "hybrid"])
def test_mcp_search_reranks_when_the_index_has_a_reranker(indexed, settings, mode):
    from rag_assets.service.mcp_server import IndexBackend, run_search

    question = "the reranker reads the question and the passage"
    with FakeRerank() as srv:
        s = replace(settings, rerank_depth=8)
        backend = IndexBackend("t", s, indexed.embedder, lambda fn: fn(indexed.conn), reranker(srv))
        res = run_search(backend, question, 3, None, mode)
        (req,) = srv.requests
    assert len(req.body["documents"]) == 8 and req.body["top_n"] == 3
    assert res.rerank.applied and res.results[0].doc_id == "target.md" and len(res.results) == 3
    plain = run_search(IndexBackend("t", s, indexed.embedder, lambda fn: fn(indexed.conn)), question, 3, None, mode)
    assert plain.rerank is None and len(plain.results) == 3
