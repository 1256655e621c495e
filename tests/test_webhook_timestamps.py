"""Hostile source timestamps (issue 16): refused at the door with a clear 4xx, or accepted and then
applied exactly once; a stored timestamp that cannot be used never blocks other events or shards,
and never pins a document against later updates and deletes."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from rag_assets.manifest import content_hash, shard_of
from rag_assets.service.app import create_app
from rag_assets.service.events import WebhookEvent
from rag_assets.store import inbox
from rag_assets.store.db import connect
from rag_assets.store.webhook_docs import apply_inbox, pending_inbox_shards
from tests.conftest import TEST_SCHEMA
from tests.service_utils import ThreadServer, event_body, new_secret, rfc3339, signed_headers

HOOK = "/webhooks/documents"
TOLERANCE_S = 300


@pytest.fixture
def secret() -> str:
    return new_secret()


@pytest.fixture
def svc_settings(settings, secret):
    return replace(settings, webhook_secret=secret, webhook_tolerance_s=TOLERANCE_S)


@pytest.fixture
def server(svc_settings):
    with ThreadServer(create_app(svc_settings, pool_timeout=5.0)) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _post(client, secret, event_id: str, body: bytes, header_ts: int | None = None) -> httpx.Response:
    return client.post(HOOK, content=body, headers=signed_headers(secret, event_id, body, header_ts))


def _apply_all(conn) -> dict:
    return apply_inbox(conn, pending_inbox_shards(conn))


def _manifest(conn, doc_id: str):
    return conn.execute(
        "SELECT content_hash, source_time FROM manifest WHERE doc_id = %s", (doc_id,)
    ).fetchone()


def _inbox_row(conn, event_id: str):
    return conn.execute(
        "SELECT source_time, received_at, applied_at, outcome FROM inbox WHERE event_id = %s",
        (event_id,),
    ).fetchone()


# --- at the door ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ts",
    [
        "9999-12-29T00:00:00Z",  # year 9999: more than a 64-bit nanosecond mtime can hold
        "0001-01-03T00:00:00Z",  # year 1
        "1969-12-31T23:59:59Z",  # before the Unix epoch
        "2262-04-12T00:00:00Z",
    ],
)
def test_out_of_range_source_timestamps_get_400_naming_the_field(client, secret, db_url, ts):
    r = _post(client, secret, "e", event_body("a.md", ts=ts))
    assert r.status_code == 400, r.text
    assert "timestamp" in r.json()["error"]
    assert inbox.pending_count(connect(db_url, schema=TEST_SCHEMA)) == 0


def test_future_source_timestamp_is_refused_and_cannot_pin_a_document(client, secret, db_url):
    """An event dated a day ahead would have pinned the document: later (real) updates and deletes got
    202 and were then silently superseded. Now it is refused; within the tolerance it is accepted."""
    ahead = datetime.now(UTC) + timedelta(days=1)
    r = _post(client, secret, "ahead", event_body("pin.md", ts=ahead, content="from the future"))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "timestamp" in err and "future" in err and "RAG_WEBHOOK_TOLERANCE_S" in err
    # 1e20 seconds from now, written out (the year overflows): refused, not a 500
    assert _post(client, secret, "far", event_body("pin.md", ts="+100000-01-01T00:00:00Z")).status_code == 400

    conn = connect(db_url, schema=TEST_SCHEMA)
    ok = _post(client, secret, "c", event_body("pin.md", ts=time.time() + TOLERANCE_S / 2, content="v1"))
    assert ok.status_code == 202
    assert _apply_all(conn)["errors"] == []
    # a later update and a later delete still take effect (their source times are later)
    t = _inbox_row(conn, "c")[0]
    upd = event_body("pin.md", "document.updated", "v2", ts=t + timedelta(microseconds=1))
    assert _post(client, secret, "u", upd).status_code == 202
    _apply_all(conn)
    assert _manifest(conn, "pin.md")[0] == content_hash("v2")
    dele = event_body("pin.md", "document.deleted", None, ts=t + timedelta(microseconds=2))
    assert _post(client, secret, "d", dele).status_code == 202
    _apply_all(conn)
    assert _manifest(conn, "pin.md") is None


def test_inbox_refuses_an_unusable_source_time(db_url):
    """The store's own entry point refuses what the HTTP door refuses (for callers other than the service)."""
    conn = connect(db_url, schema=TEST_SCHEMA)
    bad = WebhookEvent("x", "document.created", "a.md", datetime(9999, 6, 1, tzinfo=UTC), "x", {})
    with pytest.raises(inbox.InboxError, match="event 'x'.*source time"):
        inbox.insert_event(conn, bad, 8)
    naive = WebhookEvent("y", "document.created", "a.md", datetime(2026, 1, 1), "x", {})
    with pytest.raises(inbox.InboxError, match="timezone"):
        inbox.insert_event(conn, naive, 8)
    assert inbox.pending_count(conn) == 0


# --- on the apply side ----------------------------------------------------------------------


def _raw_event(conn, event_id: str, doc_id: str, source_time: str, etype: str = "document.created"):
    conn.execute(
        """INSERT INTO inbox (event_id, event_type, doc_id, shard, source_time, content, metadata)
           VALUES (%s, %s, %s, %s, %s::timestamptz, %s, '{}')""",
        (
            event_id,
            etype,
            doc_id,
            shard_of(doc_id, 8),
            source_time,
            None if etype.endswith("deleted") else "x",
        ),
    )


def test_apply_skips_and_reports_unusable_timestamps_without_blocking_others(settings, db_url, docs_dir):
    """Rows written before this fix (or by hand) with timestamps nothing downstream can use: each is
    reported by doc_id and event, marked rejected, and every other event of every shard applies."""
    from rag_assets.pipeline import Indexer

    conn = connect(db_url, schema=TEST_SCHEMA)
    inbox.shard_count(conn, 8)
    _raw_event(conn, "ev-inf", "bad/inf.md", "infinity")
    _raw_event(conn, "ev-10k", "bad/10k.md", "10000-01-01 00:00:00+00")  # Python cannot read it back
    _raw_event(conn, "ev-9999", "bad/9999.md", "9999-06-01 00:00:00+00")  # no 64-bit ns mtime
    _raw_event(conn, "ev-1", "bad/1.md", "0001-06-01 00:00:00+00")
    _raw_event(conn, "ev-older", "bad/9999.md", "2026-01-01 00:00:00+00")  # a usable event, same doc
    _raw_event(conn, "ev-good", "good/a.md", "2026-01-01 00:00:00+00")
    # a tombstone whose time cannot be used must not pin the document either
    conn.execute("INSERT INTO tombstones (doc_id, source_time) VALUES ('pinned.md', 'infinity')")
    _raw_event(conn, "ev-pinned", "pinned.md", "2026-01-01 00:00:00+00")
    out = _apply_all(conn)
    reported = {e["doc_id"]: e["error"] for e in out["errors"]}
    assert set(reported) == {"bad/inf.md", "bad/10k.md", "bad/9999.md", "bad/1.md"}, out["errors"]
    for eid, doc in [("ev-inf", "bad/inf.md"), ("ev-10k", "bad/10k.md"), ("ev-1", "bad/1.md")]:
        assert eid in reported[doc] and "source time" in reported[doc]
    assert out["events_applied"] == 3 and out["events_rejected"] == 4
    assert inbox.pending_count(conn) == 0
    for doc in ("good/a.md", "bad/9999.md", "pinned.md"):
        assert _manifest(conn, doc)[0] == content_hash("x"), doc
    outcomes = dict(conn.execute("SELECT event_id, outcome FROM inbox").fetchall())
    assert outcomes["ev-9999"].startswith("rejected: ") and outcomes["ev-older"] == "applied"
    # the whole pipeline runs (this was an OverflowError on every run)
    Indexer(settings).refresh(docs_dir)
    served = {d for (d,) in conn.execute("SELECT DISTINCT doc_id FROM items")}
    assert served == {"good/a.md", "bad/9999.md", "pinned.md"}


# --- the property ---------------------------------------------------------------------------

_ZONES = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12, minutes=-30))])


def _relative(offset_s: float) -> str:
    try:
        return rfc3339(datetime.now(UTC) + timedelta(seconds=offset_s))
    except OverflowError:
        return "+10000-01-01T00:00:00Z" if offset_s > 0 else "-0001-01-01T00:00:00Z"


hostile_timestamps = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59), timezones=_ZONES
    ).map(lambda d: d.isoformat()),
    st.floats(-2 * TOLERANCE_S, 2 * TOLERANCE_S).map(_relative),  # around the tolerance
    st.floats(-1e20, 1e20).map(_relative),
    st.sampled_from(
        [
            "9999-12-31T23:59:59Z",
            "9999-12-30T00:00:00Z",
            "0001-01-02T00:00:00Z",
            "2262-04-11T23:47:16.854775Z",
            "2262-04-11T23:47:16.854775807Z",
            "1677-09-21T00:12:43Z",
            "1970-01-01T00:00:00Z",
            "1e20",
            "infinity",
            "-infinity",
        ]
    ),
    st.sampled_from([1e20, -1, 0, None]),
)
header_offsets = st.one_of(st.just(0), st.integers(-2 * TOLERANCE_S, 2 * TOLERANCE_S), st.just(10**20))


@hsettings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ts=hostile_timestamps, header_offset=header_offsets, etype=st.sampled_from(["created", "deleted"]))
def test_property_hostile_timestamps_are_refused_or_applied_once(
    client, secret, db_url, ts, header_offset, etype
):
    conn = connect(db_url, schema=TEST_SCHEMA)
    n = conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
    doc, eid = f"prop/{n}-{time.monotonic_ns()}.md", f"hostile-{n}-{time.monotonic_ns()}"
    etype = f"document.{etype}"
    import json

    body = json.dumps(
        {"type": etype, "timestamp": ts, "data": {"doc_id": doc, "content": "hostile"}}
    ).encode()
    t_sent = time.time()
    r = _post(client, secret, eid, body, header_ts=int(t_sent) + header_offset)
    if r.status_code != 202:
        assert 400 <= r.status_code < 500, (ts, r.status_code, r.text)
        assert "timestamp" in r.json()["error"], r.text
        assert _inbox_row(conn, eid) is None
        return
    source_time, received_at, _, _ = _inbox_row(conn, eid)
    # a pin lasts at most the tolerance: nothing is accepted further ahead of the receiver's clock
    assert source_time <= received_at + timedelta(seconds=TOLERANCE_S + 1), (ts, source_time)
    out = _apply_all(conn)
    assert out["errors"] == [], (ts, out["errors"])
    assert _inbox_row(conn, eid)[3] == "applied"
    assert inbox.pending_count(conn) == 0
    if etype == "document.created":
        assert _manifest(conn, doc)[0] == content_hash("hostile")
    else:
        assert _manifest(conn, doc) is None
    # later events for the same document still take effect: an update, then a delete
    later = max(source_time, datetime.now(UTC)) + timedelta(microseconds=1)
    upd = event_body(doc, "document.updated", "after", ts=later)
    assert _post(client, secret, eid + "-u", upd).status_code == 202
    assert _apply_all(conn)["errors"] == []
    assert _manifest(conn, doc)[0] == content_hash("after"), ts
    dele = event_body(doc, "document.deleted", None, ts=later + timedelta(microseconds=1))
    assert _post(client, secret, eid + "-d", dele).status_code == 202
    assert _apply_all(conn)["errors"] == []
    assert _manifest(conn, doc) is None, ts
    with psycopg.connect(db_url) as c:
        outcomes = [
            o for (o,) in c.execute("SELECT outcome FROM inbox WHERE doc_id = %s ORDER BY seq", (doc,))
        ]
    assert outcomes == ["applied", "applied", "applied"]
    conn.close()
