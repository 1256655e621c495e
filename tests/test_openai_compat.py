"""OpenAICompatEmbedder against a real HTTP server (tests/fake_openai.py) with injected faults.

No mocks of httpx: every test speaks HTTP to 127.0.0.1. Each fault test ends either with the complete,
correct matrix (each text answered correctly by the server exactly once) or with a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import traceback
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_assets.embedders.base import EmbeddingDimensionError, EmbeddingError, EmbedStats, TextTooLongError
from rag_assets.embedders.batch_limit import BatchSizeLimit, shared_batch_limit
from rag_assets.embedders.long_texts import combine_pieces, split_text
from rag_assets.embedders.openai_compat import OpenAICompatEmbedder
from rag_assets.embedders.openai_protocol import batch_too_large
from rag_assets.embedders.rate_limit import RateLimiter, parse_retry_after, shared_limiter
from rag_assets.settings import Settings

try:
    from fake_openai import FakeOpenAI, Fault, fake_token_count, fake_vector
except ImportError:  # tests/ as a package
    from tests.fake_openai import FakeOpenAI, Fault, fake_token_count, fake_vector

SECRET = "sk-test-SECRET-4f9a1c77e2b3d5"
MODEL = "fake-embed"


@pytest.fixture
def srv():
    with FakeOpenAI(dims=8) as server:
        yield server


def make(srv: FakeOpenAI, **kw) -> OpenAICompatEmbedder:
    kw.setdefault("backoff_base_s", 0.05)
    kw.setdefault("backoff_max_s", 0.2)
    kw.setdefault("timeout_s", 5)
    kw.setdefault("seed", 1)
    kw.setdefault("dimensions", None)
    return OpenAICompatEmbedder(srv.url, kw.pop("api_key", SECRET), kw.pop("model", MODEL), **kw)


def texts_(n: int, prefix: str = "text") -> list[str]:
    return [f"{prefix} number {i}: some words about topic {i % 7}" for i in range(n)]


def expected(texts: list[str], dims: int = 8, model: str = MODEL) -> np.ndarray:
    return np.stack([fake_vector(t, dims, model) for t in texts])


def assert_complete(srv: FakeOpenAI, texts: list[str], out: np.ndarray, dims: int = 8) -> None:
    assert out.dtype == np.float32 and out.shape == (len(texts), dims)
    np.testing.assert_allclose(out, expected(texts, dims), atol=1e-6)
    served = srv.served_counts()
    assert all(served[t] == 1 for t in texts), {t: served[t] for t in texts if served[t] != 1}


# -- the happy path ----------------------------------------------------------------------------------


def test_embed_request_shape_and_result(srv: FakeOpenAI) -> None:
    emb = make(srv)
    texts = texts_(5)
    stats = EmbedStats()
    out = emb.embed(texts, stats)
    assert_complete(srv, texts, out)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    (req,) = srv.requests
    assert req.authorization == f"Bearer {SECRET}"
    assert req.body == {"model": MODEL, "input": texts, "encoding_format": "float"}
    assert stats.texts == 5 and stats.requests == 1 and stats.retries == 0
    assert stats.tokens == sum(fake_token_count(t) for t in texts)  # the provider's usage, not our count
    assert stats.seconds > 0 and len(stats.latencies_ms) == 1


def test_dimensions_option_is_sent(srv: FakeOpenAI) -> None:
    emb = make(srv, dimensions=4)
    assert emb.dims == 4 and srv.request_count == 0
    out = emb.embed(["a", "b"], EmbedStats())
    assert out.shape == (2, 4)
    assert srv.requests[0].body["dimensions"] == 4


def test_usage_falls_back_to_counted_tokens(srv: FakeOpenAI) -> None:
    srv.faults.append(Fault.no_usage())
    emb = make(srv)
    stats = EmbedStats()
    texts = texts_(3)
    emb.embed(texts, stats)
    assert stats.tokens == sum(emb.count_tokens(texts))


def test_batches_bounded_by_count_and_tokens(srv: FakeOpenAI) -> None:
    emb = make(srv, batch_size=3, concurrency=2)
    texts = texts_(10)
    out = emb.embed(texts, EmbedStats())
    assert_complete(srv, texts, out)
    assert sorted(len(r.inputs) for r in srv.requests) == [1, 3, 3, 3]

    srv.reset_counters()
    emb = make(srv, batch_size=100, batch_tokens=60)
    counts = emb.count_tokens(texts)
    out = emb.embed(texts, EmbedStats())
    assert_complete(srv, texts, out)
    by_text = dict(zip(texts, counts, strict=True))
    for r in srv.requests:
        assert sum(by_text[t] for t in r.inputs) <= 60
    assert srv.request_count > 1


def test_token_budget_with_tiktoken_counts(srv: FakeOpenAI) -> None:
    model = "text-embedding-3-small"
    texts = texts_(40)
    emb = make(srv, model=model, dimensions=8, batch_size=100, batch_tokens=60, concurrency=3)
    out = emb.embed(texts, EmbedStats())
    np.testing.assert_allclose(out, expected(texts, 8, model), atol=1e-6)
    counts = dict(zip(texts, emb.count_tokens(texts), strict=True))
    assert srv.request_count > 1
    assert all(sum(counts[t] for t in r.inputs) <= 60 for r in srv.requests)
    # Budget that cannot bind: texts are not tokenised for batching, yet a provider without
    # `usage` still gets exact token stats.
    srv.reset_counters()
    srv.rules.append(lambda no, inputs: Fault.no_usage())
    stats = EmbedStats()
    make(srv, model=model, dimensions=8, batch_size=10).embed(texts, stats)
    assert srv.request_count == 4 and stats.tokens == sum(counts.values())


def test_token_counting_uses_tiktoken_for_openai_models() -> None:
    emb = OpenAICompatEmbedder("http://127.0.0.1:9/v1", SECRET, "text-embedding-3-small")
    assert emb.exact_token_counts
    assert emb.count_tokens(["hello world", "tiktoken is great!"]) == [2, 6]
    assert emb.dims == 1536  # known model: no probe needed
    other = OpenAICompatEmbedder("http://127.0.0.1:9/v1", SECRET, "bge-m3", dimensions=1024)
    assert not other.exact_token_counts
    assert other.count_tokens(["hello world"]) == [4]  # the conservative estimate


def test_callable_from_a_worker_thread_of_a_running_event_loop(srv: FakeOpenAI) -> None:
    emb = make(srv, batch_size=2)
    texts = texts_(6)

    async def main() -> np.ndarray:
        return await asyncio.to_thread(emb.embed, texts, EmbedStats())

    out = asyncio.run(main())
    assert_complete(srv, texts, out)


# -- faults that are retried -------------------------------------------------------------------------

RECOVERABLE = [
    pytest.param(Fault.rate_limited(retry_after_ms=50), id="429-retry-after-ms"),
    pytest.param(Fault.rate_limited(), id="429-no-header"),
    pytest.param(Fault.server_error(500), id="500"),
    pytest.param(Fault.server_error(502), id="502"),
    pytest.param(Fault.server_error(503), id="503"),
    pytest.param(Fault.server_error(504), id="504"),
    pytest.param(Fault.server_error(529), id="529"),
    pytest.param(Fault.drop(), id="connection-dropped"),
    pytest.param(Fault.malformed(), id="malformed-json"),
    pytest.param(Fault.truncated(), id="truncated-body"),
    pytest.param(Fault.truncated_json(), id="truncated-json"),
]


@pytest.mark.parametrize("fault", RECOVERABLE)
def test_recoverable_fault_is_retried(srv: FakeOpenAI, fault: Fault) -> None:
    emb = make(srv, batch_size=4, concurrency=2, timeout_s=0.5)
    srv.faults.append(fault)
    texts = texts_(10)
    stats = EmbedStats()
    out = emb.embed(texts, stats)
    assert_complete(srv, texts, out)
    assert stats.retries == 1
    assert stats.requests == 4 == srv.request_count  # 3 batches + 1 retry
    assert stats.throttled == (1 if fault.status == 429 else 0)
    assert stats.texts == 10


@pytest.mark.parametrize("fault", [Fault.shuffled(), Fault.no_index()], ids=["shuffled-index", "no-index"])
def test_answer_order(srv: FakeOpenAI, fault: Fault) -> None:
    srv.rules.append(lambda no, inputs: fault)  # every answer
    emb = make(srv, batch_size=16, concurrency=3)
    texts = texts_(64)
    out = emb.embed(texts, EmbedStats())
    assert_complete(srv, texts, out)
    assert srv.request_count == 4


def test_malformed_answers_are_retried_a_bounded_number_of_times(srv: FakeOpenAI) -> None:
    srv.rules.append(lambda no, inputs: Fault.malformed())
    emb = make(srv, max_malformed_retries=2)
    with pytest.raises(EmbeddingError, match="not valid JSON"):
        emb.embed(["a"], EmbedStats())
    assert srv.request_count == 3


def test_retry_after_seconds_is_honoured(srv: FakeOpenAI) -> None:
    srv.faults.append(Fault.rate_limited(retry_after=1))
    emb = make(srv)
    stats = EmbedStats()
    t0 = time.monotonic()
    out = emb.embed(["x", "y"], stats)
    elapsed = time.monotonic() - t0
    assert_complete(srv, ["x", "y"], out)
    assert elapsed >= 1.0
    first, second = srv.requests
    assert second.t - first.t_done >= 0.99
    assert stats.throttled == 1 and stats.retries == 1
    assert stats.rate_limit_wait_s >= 1.0


def test_retry_after_pauses_every_concurrent_batch(srv: FakeOpenAI) -> None:
    srv.faults.append(Fault.rate_limited(retry_after=0.6))
    srv.latency_s = 0.05
    emb = make(srv, batch_size=1, concurrency=4)
    texts = texts_(8)
    stats = EmbedStats()
    out = emb.embed(texts, stats)
    assert_complete(srv, texts, out)
    reqs = srv.requests
    t429 = reqs[0].t_done
    # Nothing started during the pause (allowing 0.15 s for requests already on their way).
    started_during_pause = [r for r in reqs[1:] if t429 + 0.15 < r.t < t429 + 0.58]
    assert started_during_pause == []


def test_retry_after_http_date_and_ms_parsing() -> None:
    import email.utils

    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30, abs=1.01)
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "1.5", "retry-after-ms": "2500"}) == 2.5
    assert parse_retry_after({"retry-after-ms": "120"}) == pytest.approx(0.12)
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=now) == 0.0


def test_retry_after_http_date_from_server(srv: FakeOpenAI) -> None:
    srv.faults.append(Fault.rate_limited(retry_after="date:1"))
    emb = make(srv)
    stats = EmbedStats()
    out = emb.embed(["x"], stats)
    assert_complete(srv, ["x"], out)
    assert stats.rate_limit_wait_s > 0 and stats.retries == 1


def test_retry_budget_is_bounded(srv: FakeOpenAI) -> None:
    srv.rules.append(lambda no, inputs: Fault.server_error(503))
    emb = make(srv, max_retry_s=1.0, backoff_base_s=0.1, backoff_max_s=0.3)
    stats = EmbedStats()
    t0 = time.monotonic()
    with pytest.raises(EmbeddingError, match=r"retry budget 1s.*HTTP 503") as info:
        emb.embed(["x"], stats)
    assert time.monotonic() - t0 < 2.5
    assert info.value.status == 503
    assert stats.retries >= 2 and stats.requests == stats.retries + 1
    assert stats.texts == 0


def test_retry_after_beyond_budget_fails_at_once(srv: FakeOpenAI) -> None:
    srv.faults.append(Fault.rate_limited(retry_after=3600))
    emb = make(srv, max_retry_s=5)
    t0 = time.monotonic()
    with pytest.raises(EmbeddingError, match="retry after 3600"):
        emb.embed(["x"], EmbedStats())
    assert time.monotonic() - t0 < 1.0
    assert srv.request_count == 1


# -- faults that fail ---------------------------------------------------------------------------------

FATAL = [
    pytest.param(Fault.too_few(), EmbeddingError, "expected 4 embeddings, got 3", id="too-few"),
    pytest.param(Fault.too_many(), EmbeddingError, "expected 4 embeddings, got 5", id="too-many"),
    pytest.param(Fault.wrong_dims(9), EmbeddingDimensionError, "dimension 8, got 9", id="wrong-dims"),
    pytest.param(Fault.nan(), EmbeddingError, "NaN", id="nan"),
]


@pytest.mark.parametrize(("fault", "exc", "message"), FATAL)
def test_invalid_answers_fail_without_partial_result(srv: FakeOpenAI, fault, exc, message) -> None:
    srv.faults.append(fault)
    emb = make(srv, batch_size=4, dimensions=8)
    stats = EmbedStats()
    with pytest.raises(exc, match=message):
        emb.embed(texts_(4), stats)
    assert srv.request_count == 1 and stats.texts == 0


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_client_errors_fail_at_once(srv: FakeOpenAI, status: int) -> None:
    srv.faults.append(Fault.error(status, f"provider says no ({status})"))
    emb = make(srv)
    with pytest.raises(EmbeddingError, match=rf"HTTP {status}: provider says no \({status}\)") as info:
        emb.embed(["x"], EmbedStats())
    assert info.value.status == status
    assert srv.request_count == 1


def test_unauthorized_fails_at_once_without_leaking_the_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(dims=8, api_key="sk-the-right-one") as srv:
        emb = make(srv, batch_size=2, concurrency=3, dimensions=8)
        stats = EmbedStats()
        t0 = time.monotonic()
        with pytest.raises(EmbeddingError) as info:
            emb.embed(texts_(10), stats)
        assert time.monotonic() - t0 < 1.0
        err = info.value
        assert err.status == 401
        assert "Incorrect API key provided" in str(err) and "HTTP 401" in str(err)
        # The fake server echoes the key it rejected; we must scrub it.
        assert srv.requests[0].authorization == f"Bearer {SECRET}"
        assert stats.retries == 0 and srv.request_count <= 3  # no retry; siblings cancelled
        blobs = [
            str(err),
            repr(err),
            "".join(traceback.format_exception(err)),
            repr(emb),
            str(emb.fingerprint),
            repr(stats),
            str(stats.as_dict()),
            caplog.text,
        ]
        for blob in blobs:
            assert SECRET not in blob


def test_secret_never_in_logs_of_retries(srv: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    srv.faults.append(Fault.error(503, f"upstream rejected key {SECRET}"))
    emb = make(srv)
    emb.embed(["x"], EmbedStats())
    assert "retry 1" in caplog.text and "[REDACTED]" in caplog.text
    assert SECRET not in caplog.text


def test_settings_repr_and_from_settings_keep_the_key_out() -> None:
    s = Settings.from_env(
        {
            "RAG_EMBEDDER": "openai",
            "RAG_EMBEDDING_API_KEY": SECRET,
            "RAG_EMBEDDING_BASE_URL": "http://127.0.0.1:9/v1",
            "RAG_EMBEDDING_MODEL": "text-embedding-3-large",
            "RAG_EMBEDDING_DIMENSIONS": "256",
            "RAG_EMBEDDING_CONCURRENCY": "7",
            "RAG_EMBEDDING_LONG_TEXT": "split",
        }
    )
    emb = OpenAICompatEmbedder.from_settings(s)
    assert (emb.model, emb.dims, emb.concurrency, emb.long_text) == (
        "text-embedding-3-large",
        256,
        7,
        "split",
    )
    assert emb.price_per_mtok() == 0.13
    assert (
        SECRET not in repr(emb)
        and SECRET not in emb.fingerprint
        and SECRET not in repr(vars(emb)["_limiter"])
    )


# -- concurrency and rate limits ---------------------------------------------------------------------


def test_concurrency_is_bounded_even_across_calls(srv: FakeOpenAI) -> None:
    srv.latency_s = 0.03
    emb = make(srv, batch_size=2, concurrency=3)
    a, b = texts_(40, "a"), texts_(40, "b")
    results: dict[str, np.ndarray] = {}

    def run(name: str, texts: list[str]) -> None:
        results[name] = emb.embed(texts, EmbedStats())

    threads = [threading.Thread(target=run, args=("a", a)), threading.Thread(target=run, args=("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert srv.request_count == 40
    assert 2 <= srv.max_in_flight <= 3
    np.testing.assert_allclose(results["a"], expected(a), atol=1e-6)
    np.testing.assert_allclose(results["b"], expected(b), atol=1e-6)


def test_requests_per_minute_budget(srv: FakeOpenAI) -> None:
    emb = make(srv, batch_size=1, concurrency=4, rpm=240)  # one request every 0.25 s
    texts = texts_(9)
    stats = EmbedStats()
    out = emb.embed(texts, stats)
    assert_complete(srv, texts, out)
    ts = sorted(r.t for r in srv.requests)
    gaps = np.diff(ts)
    assert gaps.min() >= 0.2, gaps
    assert ts[-1] - ts[0] >= 8 * 0.25 - 0.05
    # Any 1-second window holds at most rpm/60 + 1 requests.
    assert max(sum(1 for u in ts if t <= u < t + 1.0) for t in ts) <= 5
    assert stats.rate_limit_wait_s > 1.0


def test_tokens_per_minute_budget(srv: FakeOpenAI) -> None:
    # Unknown model -> estimate_tokens: each text is 29 bytes -> 10 tokens; 5 per batch = 50 tokens.
    texts = [f"token budget text number {i:04d}" for i in range(20)]
    emb = make(srv, batch_size=5, concurrency=4, tpm=6000)  # 100 tokens/s -> a batch every 0.5 s
    assert set(emb.count_tokens(texts)) == {10}
    out = emb.embed(texts, EmbedStats())
    assert_complete(srv, texts, out)
    ts = sorted(r.t for r in srv.requests)
    assert len(ts) == 4
    assert np.diff(ts).min() >= 0.45


def test_limiter_is_shared_per_base_url_and_model(srv: FakeOpenAI) -> None:
    a = make(srv, rpm=600)
    b = make(srv, rpm=300, timeout_s=9)
    c = make(srv, model="other-model", rpm=300)
    assert a._limiter is b._limiter is shared_limiter(srv.url + "/", MODEL)
    assert a._limiter is not c._limiter
    assert a._limiter.rpm == 300  # the strictest budget wins

    # Two instances in two threads together stay within the one budget (0.2 s apart).
    def run(emb: OpenAICompatEmbedder, prefix: str) -> None:
        emb.embed(texts_(4, prefix), EmbedStats())

    a.batch_size = b.batch_size = 1
    threads = [threading.Thread(target=run, args=(a, "a")), threading.Thread(target=run, args=(b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ts = sorted(r.t for r in srv.requests)
    assert len(ts) == 8
    assert np.diff(ts).min() >= 0.15


def test_rate_limiter_unit() -> None:
    now = [0.0]
    lim = RateLimiter(rpm=60, tpm=600, clock=lambda: now[0])
    # Reservations: request 1 now; request 2 one second later (rpm) but 100 tokens need 10 s (tpm).
    assert lim.acquire(100) == 0.0
    assert lim._next_request == 1.0 and lim._next_token == 10.0
    lim.tighten(rpm=30, tpm=None)
    assert lim.rpm == 30 and lim.tpm == 600


# -- long texts ---------------------------------------------------------------------------------------


def test_long_text_error_names_the_label(srv: FakeOpenAI) -> None:
    emb = make(srv, model="text-embedding-3-small", dimensions=8, max_input_tokens=50)
    long = " ".join(["word"] * 200)
    with pytest.raises(TextTooLongError) as info:
        emb.embed(["short", long, "short too"], EmbedStats(), labels=["doc.md#0", "doc.md#1", "doc.md#2"])
    msg = str(info.value)
    assert "doc.md#1" in msg and "200 tokens" in msg and "50" in msg
    assert info.value.label == "doc.md#1"
    assert srv.request_count == 0


def test_long_text_at_the_end_fails_before_any_request(srv: FakeOpenAI) -> None:
    # Short texts are tokenised lazily while earlier batches are sent; long ones are checked up front.
    emb = make(srv, model="text-embedding-3-small", dimensions=8, max_input_tokens=100, batch_size=10)
    texts = [*texts_(300), " ".join(["word"] * 101)]
    with pytest.raises(TextTooLongError, match="c#300: 101 tokens"):
        emb.embed(texts, EmbedStats(), labels=[f"c#{i}" for i in range(len(texts))])
    assert srv.request_count == 0
    out = emb.embed(texts[:-1], EmbedStats())
    assert out.shape == (300, 8) and srv.request_count == 30


def test_base64_encoding_format(srv: FakeOpenAI) -> None:
    emb = make(srv, encoding_format="base64", batch_size=3)
    texts = texts_(7)
    srv.faults.append(Fault.shuffled())
    out = emb.embed(texts, EmbedStats())
    assert_complete(srv, texts, out)
    assert {r.body["encoding_format"] for r in srv.requests} == {"base64"}
    assert emb.fingerprint == make(srv).fingerprint


def test_constant_vector_mode_of_the_fake(srv: FakeOpenAI) -> None:
    srv.constant_vectors = True
    out = make(srv).embed(texts_(3), EmbedStats())
    np.testing.assert_allclose(out, np.stack([fake_vector("constant", 8)] * 3), atol=1e-6)


def test_empty_text_is_rejected_before_sending(srv: FakeOpenAI) -> None:
    emb = make(srv, dimensions=8)
    with pytest.raises(EmbeddingError, match="a.md#3: cannot embed an empty text"):
        emb.embed(["x", ""], EmbedStats(), labels=["a.md#2", "a.md#3"])
    assert srv.request_count == 0
    assert emb.embed([], EmbedStats()).shape == (0, 8)


def test_long_text_split_mode(srv: FakeOpenAI) -> None:
    emb = make(srv, model="text-embedding-3-small", dimensions=8, max_input_tokens=40, long_text="split")
    paragraphs = [f"Paragraph {i} talks about subject {i} in some detail, at length." for i in range(12)]
    long = "\n\n".join(paragraphs)
    texts = ["short one", long, "short two"]
    assert emb.count_tokens([long])[0] > 40
    stats = EmbedStats()
    out = emb.embed(texts, stats, labels=["d#0", "d#1", "d#2"])
    assert out.shape == (3, 8) and stats.texts == 3
    sent = [t for r in srv.requests for t in r.inputs]
    pieces = [t for t in sent if t not in ("short one", "short two")]
    assert len(pieces) >= 2
    assert all(n <= 40 for n in emb.count_tokens(pieces))
    assert "".join(pieces) == long  # cut at paragraph boundaries, nothing lost
    weights = emb.count_tokens(pieces)
    want = combine_pieces(np.stack([fake_vector(p, 8, "text-embedding-3-small") for p in pieces]), weights)
    np.testing.assert_allclose(out[1], want, atol=1e-6)
    np.testing.assert_allclose(out[0], fake_vector("short one", 8, "text-embedding-3-small"), atol=1e-6)
    assert np.linalg.norm(out[1]) == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    text=st.lists(
        st.sampled_from(["a", "b", " ", ".", ",", "\n", "\n\n", ". ", "word", "xyzzy" * 9]),
        min_size=1,
        max_size=120,
    ).map("".join),
    limit=st.integers(min_value=3, max_value=40),
)
def test_split_text_pieces_fit_and_lose_nothing(text: str, limit: int) -> None:
    def count(s: str) -> int:
        return max(1, (len(s.encode()) + 2) // 3)

    pieces = split_text(text, limit, count)
    assert pieces
    assert all(count(p) <= limit for p in pieces)
    assert re.sub(r"\s", "", "".join(pieces)) == re.sub(r"\s", "", text)


# -- identity: dims and fingerprint ------------------------------------------------------------------


def test_unknown_model_dims_are_probed_before_the_first_batch(srv: FakeOpenAI) -> None:
    emb = make(srv)
    assert not emb.dims_known and srv.request_count == 0
    fp = emb.fingerprint  # a pure function of the configuration: no request
    assert fp.startswith(f"openai:{MODEL}:native:norm:") and srv.request_count == 0
    assert emb.dims == 8  # reading dims needs them: one small probe request
    assert srv.request_count == 1 and srv.requests[0].inputs == ["dimension probe"]
    assert emb.fingerprint == fp  # learning the size does not change the identity
    assert emb.probe() == 8
    # Once learned, the dimension is enforced.
    srv.faults.append(Fault.wrong_dims(9))
    with pytest.raises(EmbeddingDimensionError):
        emb.embed(["x"], EmbedStats())


def test_fingerprint_rules(srv: FakeOpenAI) -> None:
    base = OpenAICompatEmbedder("https://api.openai.com/v1", SECRET, "text-embedding-3-small")
    fp = base.fingerprint
    assert fp.startswith("openai:text-embedding-3-small:1536:norm:")
    same = [
        OpenAICompatEmbedder("https://api.openai.com/v1", "other-key", "text-embedding-3-small", timeout_s=5),
        OpenAICompatEmbedder("https://gateway.example/openai/v1", SECRET, "text-embedding-3-small"),
        OpenAICompatEmbedder(
            "https://api.openai.com/v1",
            SECRET,
            "text-embedding-3-small",
            batch_size=7,
            batch_tokens=999,
            concurrency=16,
            rpm=10,
            tpm=1000,
            max_retry_s=5,
            max_input_tokens=100,
            long_text="split",
        ),
    ]
    assert all(e.fingerprint == fp for e in same)
    different = [
        OpenAICompatEmbedder("https://api.openai.com/v1", SECRET, "text-embedding-3-large"),
        OpenAICompatEmbedder("https://api.openai.com/v1", SECRET, "text-embedding-3-small", dimensions=512),
        OpenAICompatEmbedder("https://api.openai.com/v1", SECRET, "text-embedding-3-small", dimensions=1536),
    ]
    fps = [e.fingerprint for e in different]
    assert fp not in fps and len(set(fps)) == len(fps)
    assert all(SECRET not in f for f in [fp, *fps])


def test_invalid_configuration_is_rejected() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        OpenAICompatEmbedder("https://api.openai.com/v1", SECRET, "text-embedding-3-small", dimensions=4096)
    with pytest.raises(ValueError, match="long_text"):
        OpenAICompatEmbedder("https://api.openai.com/v1", SECRET, "m", long_text="truncate")
    with pytest.raises(ValueError, match="http"):
        OpenAICompatEmbedder(f"ftp://{SECRET}@host/v1", SECRET, "m")


def test_every_text_once_with_many_faults(srv: FakeOpenAI) -> None:
    """A mix of faults over many concurrent batches still yields the complete matrix."""
    srv.faults.extend(
        [
            Fault.rate_limited(retry_after_ms=30),
            Fault.server_error(502),
            Fault.shuffled(),
            Fault.truncated(),
            Fault.drop(),
            Fault.malformed(),
            Fault.server_error(529),
        ]
    )
    emb = make(srv, batch_size=5, concurrency=4)
    texts = texts_(100)
    stats = EmbedStats()
    out = emb.embed(texts, stats)
    assert_complete(srv, texts, out)
    assert stats.retries == 6 and stats.requests == 26
    assert Counter(r.fault for r in srv.requests if r.fault)["shuffled"] == 1


# -- batches the server cannot take: split, learn the size, reuse it ---------------------------------


def test_hung_batch_is_split_and_the_size_is_remembered(srv: FakeOpenAI) -> None:
    """A read timeout on a batch of 4 is not retried unchanged: its halves are sent at once."""
    srv.faults.append(Fault.hang(3.0))
    emb = make(srv, batch_size=4, concurrency=2, timeout_s=0.5)
    texts = texts_(10)
    stats = EmbedStats()
    t0 = time.monotonic()
    out = emb.embed(texts, stats)
    assert time.monotonic() - t0 < 2.0  # one timeout, no backoff
    assert_complete(srv, texts, out)
    assert sorted(srv.batch_sizes()) == [2, 2, 2, 4, 4]  # batches 4, 4, 2; the hung 4 sent again as 2 + 2
    assert stats.batch_splits == 1 and stats.retries == 1 and stats.requests == 5
    assert stats.batch_size_limit == 2 and emb.effective_batch_size == 2
    assert stats.as_dict()["batch_splits"] == 1 and stats.as_dict()["batch_size_limit"] == 2


def test_hung_single_text_is_retried_unsplit(srv: FakeOpenAI) -> None:
    srv.faults.append(Fault.hang(3.0))
    emb = make(srv, batch_size=1, concurrency=2, timeout_s=0.5)
    texts = texts_(3)
    stats = EmbedStats()
    out = emb.embed(texts, stats)
    assert_complete(srv, texts, out)
    assert srv.batch_sizes() == [1, 1, 1, 1]
    assert stats.retries == 1 and stats.batch_splits == 0 and stats.batch_size_limit is None


TOO_LARGE = [
    pytest.param(413, None, 3, id="tei-413"),
    pytest.param(422, None, 3, id="tei-style-422"),
    pytest.param(
        400,
        "Invalid 'input': array too long. Expected an array with maximum length {max}, "
        "but got an array with length {n} instead.",
        3,
        id="openai-style-400",
    ),
    pytest.param(413, "Failed to buffer the request body: length limit exceeded", 2, id="413-no-size-halves"),
    pytest.param(422, "too many inputs in one request", 2, id="422-no-size-halves"),
]


@pytest.mark.parametrize(("status", "message", "learned"), TOO_LARGE)
def test_batch_too_large_is_split_and_the_size_is_reused(status, message, learned) -> None:
    """The server takes at most 3 inputs. The limit it names is adopted at once (else halving finds
    one that works); later batches, in this call and in a new embedder, start there."""
    with FakeOpenAI(dims=8, max_batch_size=3, batch_limit_status=status, batch_limit_message=message) as srv:
        emb = make(srv, batch_size=8, concurrency=1)
        texts = texts_(20)
        stats = EmbedStats()
        out = emb.embed(texts, stats)
        assert_complete(srv, texts, out)
        refused = [r for r in srv.requests if r.status == status]
        assert refused and all(len(r.inputs) > 3 for r in refused)
        assert stats.batch_splits == len(refused) and stats.retries == len(refused)
        assert stats.batch_size_limit == learned
        # Once learned, no batch above it is sent: only the first batch of 8 (and, when halving,
        # its first half of 4) was refused.
        assert len(refused) == (1 if learned == 3 else 2)
        assert all(len(r.inputs) <= learned for r in srv.requests if r.status == 200)

        srv.reset_counters()
        again = make(srv, batch_size=8, concurrency=2, timeout_s=9)  # a new instance, same endpoint
        more = texts_(13, "more")
        stats2 = EmbedStats()
        out2 = again.embed(more, stats2)
        assert_complete(srv, more, out2)
        assert sorted(srv.batch_sizes()) == sorted(
            [learned] * (13 // learned) + [13 % learned] * (13 % learned > 0)
        )
        assert stats2.batch_splits == 0 and stats2.batch_size_limit == learned


def test_single_text_too_large_fails_at_once_naming_it(srv: FakeOpenAI) -> None:
    srv.max_batch_size = 0
    emb = make(srv, batch_size=4)
    with pytest.raises(EmbeddingError) as info:
        emb.embed(["one", "two"], EmbedStats(), labels=["guide.md#0", "guide.md#1"])
    message = str(info.value)
    assert "HTTP 413: batch size 1 > maximum allowed batch size 0" in message
    assert f"{srv.url}/embeddings" in message and "guide.md#0" in message
    assert info.value.status == 413 and info.value.label == "guide.md#0"
    assert srv.batch_sizes() == [2, 1]


def test_client_errors_about_other_things_are_not_split(srv: FakeOpenAI) -> None:
    srv.faults.append(Fault.error(400, "This model's maximum context length is 8192 tokens"))
    emb = make(srv, batch_size=4)
    with pytest.raises(EmbeddingError, match="HTTP 400: This model's maximum context length"):
        emb.embed(texts_(4), EmbedStats())
    assert srv.batch_sizes() == [4]


def test_slow_large_batches_are_halved_until_one_is_answered_in_time() -> None:
    """A server that needs longer than the timeout for more than 2 inputs: 8 -> 4 -> 2, and from then on
    every batch goes out at 2. The old behaviour re-sent the batch of 8 until the retry budget ran out."""
    with FakeOpenAI(dims=8, slow_above=2, slow_s=5.0) as srv:
        emb = make(srv, batch_size=8, concurrency=2, timeout_s=0.5, max_retry_s=30)
        texts = texts_(40)
        stats = EmbedStats()
        t0 = time.monotonic()
        out = emb.embed(texts, stats)
        elapsed = time.monotonic() - t0
        assert_complete(srv, texts, out)
        # two timeouts of 0.5 s per worker, not the 30 s retry budget (the old behaviour); the bound leaves
        # room for a loaded 2-core machine (one CI run took 5.8 s), the counts below check the halving exactly
        assert elapsed < 12.0
        slow = [r for r in srv.requests if r.fault == "slow"]
        assert stats.batch_splits == len(slow) and 2 <= len(slow) <= 4  # 8 and 4, in each of 2 workers
        assert {len(r.inputs) for r in slow} <= {8, 4}
        assert stats.batch_size_limit == 2
        assert sum(1 for r in srv.requests if r.status == 200) == 20  # 40 texts, 2 per request


def test_single_text_that_times_out_fails_within_the_budget_naming_it_and_the_setting() -> None:
    """Nothing is answered in time: the batch is split down to one text, which is retried within the
    remaining budget, then fails naming the text, the endpoint, the timeout and what to raise."""
    with FakeOpenAI(dims=8, slow_above=0, slow_s=5.0) as srv:
        emb = make(srv, batch_size=4, concurrency=1, timeout_s=0.3, max_retry_s=1.0)
        labels = ["a.md#0", "a.md#1", "b.md#0", "b.md#1"]
        stats = EmbedStats()
        t0 = time.monotonic()
        with pytest.raises(EmbeddingError) as info:
            emb.embed(texts_(4), stats, labels=labels)
        elapsed = time.monotonic() - t0
        endpoint = f"{srv.url}/embeddings"
    message = str(info.value)
    assert elapsed < 1.0 + 2 * 0.3 + 0.5  # the retry budget plus about one timeout
    assert "a.md#0 alone was not answered within 0.3s" in message
    assert "RAG_EMBEDDING_TIMEOUT_S (now 0.3)" in message and "RAG_EMBEDDING_MAX_RETRY_S=1" in message
    assert endpoint in message and "timed out after 0.3s" in message
    assert info.value.label == "a.md#0"
    assert stats.batch_splits == 2 and stats.batch_size_limit == 1  # 4 -> 2 -> 1
    assert srv.batch_sizes()[:3] == [4, 2, 1]
    # Dagster reports the innermost cause of a failed step: ours must not drag an httpx one along.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_batch_too_large_messages() -> None:
    tei = "batch size 64 > maximum allowed batch size 32"
    assert batch_too_large(413, tei, 64) == 32
    assert batch_too_large(422, tei, 64) == 32
    assert batch_too_large(400, "input batch size 100 > maximum allowed batch size 64", 100) == 64
    openai = "Invalid 'input': array too long. Expected an array with maximum length 2048, but got 3000."
    assert batch_too_large(400, openai, 3000) == 2048
    assert batch_too_large(413, "Failed to buffer the request body: length limit exceeded", 9) == 5
    assert batch_too_large(422, "max_client_batch_size is 16", 20) == 16
    assert batch_too_large(413, tei, 1) is None  # one text cannot be split
    assert batch_too_large(400, "This model's maximum context length is 8192 tokens", 64) is None
    assert batch_too_large(422, "Input validation error: `inputs` must have less than 512 tokens", 8) is None
    assert batch_too_large(401, tei, 64) is None
    assert batch_too_large(413, "maximum allowed batch size 100", 64) == 32  # a named max that is no help
    assert batch_too_large(413, "Request body exceeds the limit of 2 MB", 64) == 32  # bytes, not inputs
    assert batch_too_large(422, "too many inputs: at most 10 inputs per request", 64) == 10


def test_batch_size_limit_is_shared_per_base_url_and_model_and_only_goes_down(srv: FakeOpenAI) -> None:
    a = make(srv)
    b = make(srv, timeout_s=9)
    c = make(srv, model="other-model")
    assert a._batch_limit is b._batch_limit is shared_batch_limit(srv.url + "/", MODEL)
    assert a._batch_limit is not c._batch_limit
    lim = BatchSizeLimit()
    assert lim.cap(128) == 128
    assert lim.lower(16, "test") and lim.cap(128) == 16 and lim.cap(4) == 4
    assert not lim.lower(32, "test") and lim.size == 16
    assert lim.lower(0, "test") and lim.size == 1


def test_embed_stats_merge_keeps_the_smallest_limit() -> None:
    a, b, c = EmbedStats(), EmbedStats(), EmbedStats()
    a.add(batch_splits=2)
    a.note_batch_size_limit(16)
    b.add(batch_splits=1)
    b.note_batch_size_limit(8)
    b.note_batch_size_limit(32)
    assert b.batch_size_limit == 8
    a.merge(b)
    a.merge(c)
    assert a.batch_splits == 3 and a.batch_size_limit == 8
    assert c.as_dict()["batch_size_limit"] is None and c.as_dict()["batch_splits"] == 0
