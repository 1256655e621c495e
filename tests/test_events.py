"""Event parsing and validation (pure): every bad input is an EventError with a reason, never a crash."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_assets.service.events import EventError, WebhookEvent, body_timestamp, parse_event, parse_json


def _obj(**over) -> dict:
    o = {
        "type": "document.created",
        "timestamp": "2026-01-02T03:04:05Z",
        "data": {"doc_id": "guides/a.md", "content": "# A\n\ntext", "metadata": {"tags": ["x"]}},
    }
    o.update(over)
    return o


def _data(**over) -> dict:
    d = {"doc_id": "guides/a.md", "content": "# A\n\ntext", "metadata": {"tags": ["x"]}}
    d.update(over)
    return {k: v for k, v in d.items() if v is not _MISSING}


_MISSING = object()


def test_valid_events():
    e = parse_event(_obj(), "msg_1")
    assert e == WebhookEvent(
        "msg_1",
        "document.created",
        "guides/a.md",
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "# A\n\ntext",
        {"tags": ["x"]},
    )
    u = parse_event(_obj(type="document.updated", data=_data(content="", metadata=_MISSING)), "m")
    assert (u.content, u.metadata) == ("", {})
    d = parse_event(_obj(type="document.deleted", data={"doc_id": "guides/a.md"}), "m")
    assert d.is_delete and d.content is None and d.metadata == {}
    d2 = parse_event(_obj(type="document.deleted", data=_data(content="ignored")), "m")
    assert d2.content is None
    assert parse_event(_obj(data=_data(metadata=None)), "m").metadata == {}


@pytest.mark.parametrize(
    "ts, expected",
    [
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02t03:04:05z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02 03:04:05.123456+02:00", datetime(2026, 1, 2, 1, 4, 5, 123456, tzinfo=UTC)),
        (
            "2026-01-02T03:04:05.5-05:30",
            datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
        ),
    ],
)
def test_rfc3339_timestamps(ts, expected):
    assert parse_event(_obj(timestamp=ts), "m").source_time == expected


@pytest.mark.parametrize(
    "ts",
    [
        "2026-01-02T03:04:05",  # no timezone
        "2026-01-02",
        "2026-13-02T03:04:05Z",
        "2026-02-30T03:04:05Z",
        "0000-01-01T00:00:00Z",
        "2026-01-02T03:04:05+24:00",
        "1767323045",
        1767323045,
        None,
        "2026-01-02T03:04:05Z junk",
        "0001-01-01T00:00:00+05:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        "0001-01-01T00:00:00Z",  # a session time zone west of UTC could not read it back
    ],
)
def test_bad_timestamps(ts):
    with pytest.raises(EventError, match="timestamp"):
        parse_event(_obj(timestamp=ts), "m")


@pytest.mark.parametrize(
    "obj, match",
    [
        (_obj(type="document.moved"), "type must be one of"),
        (_obj(type=None), "type must be one of"),
        ({k: v for k, v in _obj().items() if k != "data"}, "data must be an object"),
        (_obj(data=[]), "data must be an object"),
        (_obj(data=_data(doc_id="")), "doc_id must be a non-empty string"),
        (_obj(data=_data(doc_id=5)), "doc_id must be a non-empty string"),
        (_obj(data=_data(doc_id="a\x00b")), "NUL"),
        (_obj(data=_data(doc_id="a\nb")), "control character"),
        (_obj(data=_data(doc_id="a\x7fb")), "control character"),
        (_obj(data=_data(doc_id="x" * 2049)), "2048 bytes"),
        (_obj(data=_data(doc_id="é" * 1025)), "2048 bytes"),
        (_obj(data=_data(doc_id="\ud800")), "UTF-8"),
        (_obj(data=_data(content=_MISSING)), "content .* is required"),
        (_obj(data=_data(content=None)), "content .* is required"),
        (_obj(data=_data(content=5)), "content .* is required"),
        (_obj(data=_data(content="a\x00b")), "NUL"),
        (_obj(data=_data(content="\udcff")), "UTF-8"),
        (_obj(type="document.deleted", data=_data(content=5)), "content must be a string"),
        (_obj(data=_data(metadata=[])), "metadata must be an object"),
        (_obj(data=_data(metadata="x")), "metadata must be an object"),
        (_obj(data=_data(metadata={"a": "\x00"})), "NUL"),
        (_obj(data=_data(metadata={"a\x00": 1})), "NUL"),
        (_obj(data=_data(metadata={"a": ["\ud800"]})), "UTF-8"),
        (_obj(data=_data(metadata={"a": float("inf")})), "non-finite"),
    ],
)
def test_bad_events(obj, match):
    with pytest.raises(EventError, match=match) as e:
        parse_event(obj, "m")
    assert e.value.reason == "bad_event"


@pytest.mark.parametrize(
    "doc_id, problem",
    [
        ("./x.md", "'.' segment"),
        ("a/./b.md", "'.' segment"),
        (".", "'.' segment"),
        ("a//b.md", "empty segment"),
        ("a/", "empty segment"),
        ("/etc/passwd", "empty segment"),
        ("../x.md", "'..' segment"),
        ("a/../x.md", "'..' segment"),
        ("a/..", "'..' segment"),
        ("../../etc/passwd", "'..' segment"),
    ],
)
def test_non_canonical_doc_ids(doc_id, problem):
    """A folder document's id is a normalised relative path; a webhook id that only spells one
    differently (`./a.md` for `a.md`) would slip past the check that keeps the two sources apart."""
    with pytest.raises(EventError, match=f"data.doc_id .* not canonical.*{problem}") as e:
        parse_event(_obj(data=_data(doc_id=doc_id)), "m")
    assert e.value.reason == "bad_event"


@pytest.mark.parametrize("doc_id", ["a.md", "a/b/c.md", "..a/b..", "a/.b/c.", "...", "back\\slash", "a b/ü"])
def test_canonical_doc_ids_pass(doc_id):
    assert parse_event(_obj(data=_data(doc_id=doc_id)), "m").doc_id == doc_id


def test_source_time_range_and_future_tolerance():
    now = datetime(2026, 6, 1, tzinfo=UTC).timestamp()
    ok = parse_event(_obj(timestamp="2026-06-01T00:04:59Z"), "m", max_future_s=300, now=now)
    assert ok.source_time == datetime(2026, 6, 1, 0, 4, 59, tzinfo=UTC)
    assert parse_event(_obj(timestamp="1970-01-01T00:00:00Z"), "m", max_future_s=300, now=now)
    for ts, match in [
        ("2026-06-01T00:05:01Z", "more than 300 s in the future .*RAG_WEBHOOK_TOLERANCE_S"),
        ("2027-01-01T00:00:00Z", "in the future"),
        ("9999-12-29T00:00:00Z", "after 2262"),
        ("1969-12-31T23:59:59Z", "before 1970"),
        ("0001-01-03T00:00:00Z", "before 1970"),
    ]:
        with pytest.raises(EventError, match=match) as e:
            parse_event(_obj(timestamp=ts), "m", max_future_s=300, now=now)
        assert e.value.reason == "bad_timestamp" and "timestamp" in str(e.value)
    # without a tolerance (a pure parse), the range still holds: nothing downstream could store it
    with pytest.raises(EventError, match="after 2262"):
        parse_event(_obj(timestamp="9999-12-29T00:00:00Z"), "m")


def test_metadata_depth_is_bounded():
    deep: dict = {}
    cur = deep
    for _ in range(40):
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(EventError, match="nested deeper"):
        parse_event(_obj(data=_data(metadata=deep)), "m")


@pytest.mark.parametrize("eid", [None, "", 5, ["a"], "x" * 257, "has space\n", "ü-nicode", "tab\tid"])
def test_bad_event_ids(eid):
    with pytest.raises(EventError, match="event id"):
        parse_event(_obj(), eid)


def test_event_ids():
    for eid in ("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", "550e8400-e29b-41d4-a716-446655440000", "a b", "x" * 256):
        assert parse_event(_obj(), eid).event_id == eid


@pytest.mark.parametrize(
    "body, match",
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"str"', "must be a JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": Infinity}', "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "not valid JSON"),  # beyond Python's int digit limit
    ],
)
def test_bad_json(body, match):
    with pytest.raises(EventError, match=match) as e:
        parse_json(body)
    assert e.value.reason == "bad_json"


def test_body_timestamp():
    assert body_timestamp(_obj()) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with pytest.raises(EventError):
        body_timestamp({})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.dictionaries(st.sampled_from(["type", "timestamp", "data", "id", "x"]), json_values),
    eid=st.text(),
)
def test_property_arbitrary_payloads_either_parse_or_raise_event_error(payload, eid):
    body = json.dumps(payload).encode("utf-8", "surrogatepass")
    try:
        obj = parse_json(body)
        e = parse_event(obj, eid)
    except EventError:
        return
    # Whatever parses is storable: UTF-8 text without NUL, an aware timestamp.
    assert e.source_time.tzinfo is not None
    assert "\x00" not in e.doc_id + (e.content or "")
    json.dumps(e.metadata).encode("utf-8")
