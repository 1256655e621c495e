"""Webhook event parsing and validation: raw (already verified) bytes → a ``WebhookEvent``.

Pure functions. Everything that Postgres would refuse later (NUL characters, lone surrogates that
are not UTF-8, non-finite numbers in JSON, absurd nesting) is refused here with a reason, so a bad
event is a clear 400 and never a 500 halfway through a write.

Payload (Standard Webhooks shape)::

    {"type": "document.created" | "document.updated" | "document.deleted",
     "timestamp": "2026-01-02T03:04:05Z",       # RFC 3339 with offset: when the source changed it
     "data": {"doc_id": "...", "content": "...", "metadata": {...}},
     "id": "evt_..."}                            # optional; the event id for sha256= senders
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rag_assets.sources import DocumentError, validate_doc_id
from rag_assets.store.inbox import doc_id_problem, source_time_problem

EVENT_TYPES = ("document.created", "document.updated", "document.deleted")
MAX_EVENT_ID_LEN = 256
MAX_METADATA_DEPTH = 32
_RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)


_MIN_TIME = datetime(1, 1, 2, tzinfo=UTC)
_MAX_TIME = datetime(9999, 12, 30, tzinfo=UTC)


class EventError(ValueError):
    """The request cannot become an event. ``reason`` is the metric label (``bad_json``, ``bad_event``
    or ``bad_timestamp``)."""

    def __init__(self, message: str, reason: str = "bad_event"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class WebhookEvent:
    event_id: str
    type: str
    doc_id: str
    source_time: datetime  # timezone-aware
    content: str | None  # None for deletes
    metadata: dict = field(default_factory=dict)

    @property
    def is_delete(self) -> bool:
        return self.type == "document.deleted"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict:
    """The body as a JSON object (strict: UTF-8, no NaN/Infinity, no duplicate nesting blowups)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise EventError("body is not UTF-8", "bad_json") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise EventError(f"body is not valid JSON: {str(e)[:200]}", "bad_json") from None
    if not isinstance(obj, dict):
        raise EventError("body must be a JSON object", "bad_json")
    return obj


def _has_control(s: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in s)


def check_text(value: str, what: str) -> None:
    """A string Postgres can store: valid UTF-8 (no lone surrogates) and no NUL."""
    if "\x00" in value:
        raise EventError(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise EventError(f"{what} is not valid UTF-8 (lone surrogate)") from None


def check_json_value(value: object, what: str, depth: int = 0) -> None:
    """Recursively: storable strings (keys too), finite numbers, bounded depth."""
    if depth > MAX_METADATA_DEPTH:
        raise EventError(f"{what} is nested deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, str):
        check_text(value, what)
    elif isinstance(value, bool) or value is None or isinstance(value, int):
        return
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise EventError(f"{what} has a non-finite number")
    elif isinstance(value, list):
        for v in value:
            check_json_value(v, what, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, f"{what} key")
            check_json_value(v, what, depth + 1)
    else:  # pragma: no cover - json.loads produces nothing else
        raise EventError(f"{what} has an unsupported value")


def parse_timestamp(value: object, what: str = "timestamp") -> datetime:
    """RFC 3339 date-time with a timezone → aware datetime."""
    bad = "bad_timestamp"
    if not isinstance(value, str):
        raise EventError(f"{what} must be an RFC 3339 string", bad)
    if not _RFC3339_RE.match(value):
        raise EventError(f"{what} must be RFC 3339 with a timezone, e.g. 2026-01-02T03:04:05Z", bad)
    try:
        dt = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    except ValueError as e:
        raise EventError(f"{what} is not a valid date-time: {e}", bad) from None
    if dt.tzinfo is None or dt.utcoffset() is None:  # pragma: no cover - the regex requires one
        raise EventError(f"{what} needs a timezone", bad)
    try:
        utc = dt.astimezone(UTC)
    except (OverflowError, ValueError):  # e.g. 0001-01-01T00:00+05:00 is before year 1 in UTC
        raise EventError(f"{what} is out of range", bad) from None
    if not _MIN_TIME <= utc <= _MAX_TIME:  # a day's margin: any session time zone can read it back
        raise EventError(f"{what} is out of range", bad)
    return dt


def check_source_time(
    dt: datetime, max_future_s: float | None = None, now: float | None = None, what: str = "timestamp"
) -> None:
    """A source time the index can use, and (with ``max_future_s``) not ahead of our clock.

    Every later stage must be able to store it (``rag_assets.store.inbox.source_time_problem``: 1970 to
    2262). An event dated ahead of the receiver's clock by more than the tolerance would win over
    every real update and delete until that date ("newest source time wins"), so it is refused.
    """
    problem = source_time_problem(dt)
    if problem:
        raise EventError(f"{what}: {problem}", "bad_timestamp")
    if max_future_s is not None:
        now = time.time() if now is None else now
        if dt.timestamp() > now + max_future_s:
            raise EventError(
                f"{what} {dt.isoformat()} is more than {max_future_s:g} s in the future "
                "(RAG_WEBHOOK_TOLERANCE_S): a source time ahead of the receiver's clock would win over "
                "every later update and delete",
                "bad_timestamp",
            )


def validate_event_id(value: object) -> str:
    """Event ids: 1–256 printable ASCII characters (Standard Webhooks ids like ``msg_2K…``, UUIDs)."""
    if value is None or value == "":
        raise EventError("event id is missing: send a webhook-id header (or an id field with sha256=)")
    if not isinstance(value, str):
        raise EventError("event id must be a string")
    if len(value) > MAX_EVENT_ID_LEN:
        raise EventError(f"event id is longer than {MAX_EVENT_ID_LEN} characters")
    if not value.isascii() or not value.isprintable():
        raise EventError("event id must be printable ASCII")
    return value


def body_timestamp(obj: dict) -> datetime:
    """The payload's ``timestamp`` (for the sha256= style's replay window)."""
    return parse_timestamp(obj.get("timestamp"))


def _shown(doc_id: str) -> str:
    return repr(doc_id if len(doc_id) <= 100 else doc_id[:100] + "…")


def check_doc_id(doc_id: str, what: str = "data.doc_id") -> None:
    """A canonical relative path (``a/b.md``), as the folder source produces: see ``doc_id_problem``."""
    problem = doc_id_problem(doc_id)
    if problem is None:
        return
    segments = doc_id.split("/")
    canonical = "/".join(s for s in segments if s not in ("", "."))
    hint = f"; send {_shown(canonical)}" if canonical and ".." not in segments else ""
    raise EventError(f"{what} {_shown(doc_id)} is not canonical: it {problem}{hint}")


def parse_event(
    obj: dict, event_id: object, *, max_future_s: float | None = None, now: float | None = None
) -> WebhookEvent:
    """Validate a parsed payload. Raises ``EventError`` naming the first problem.

    ``max_future_s`` (the service passes RAG_WEBHOOK_TOLERANCE_S) refuses a source timestamp
    further ahead of ``now`` (default: the clock) than that; see :func:`check_source_time`.
    """
    eid = validate_event_id(event_id)
    etype = obj.get("type")
    if etype not in EVENT_TYPES:
        raise EventError(f"type must be one of {', '.join(EVENT_TYPES)}")
    source_time = parse_timestamp(obj.get("timestamp"))
    check_source_time(source_time, max_future_s, now)
    data = obj.get("data")
    if not isinstance(data, dict):
        raise EventError("data must be an object")
    doc_id = data.get("doc_id")
    if not isinstance(doc_id, str) or not doc_id:
        raise EventError("data.doc_id must be a non-empty string")
    try:
        validate_doc_id(doc_id)
    except DocumentError as e:
        raise EventError(f"data.doc_id: {e.reason}") from None
    if _has_control(doc_id):
        raise EventError("data.doc_id contains a control character")
    check_doc_id(doc_id)
    content = data.get("content")
    if etype == "document.deleted":
        if content is not None and not isinstance(content, str):
            raise EventError("data.content must be a string")
        content = None  # a delete carries no body
    else:
        if not isinstance(content, str):
            raise EventError(f"data.content (a string, may be empty) is required for {etype}")
        check_text(content, "data.content")
    metadata = data.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise EventError("data.metadata must be an object")
    check_json_value(metadata, "data.metadata")
    return WebhookEvent(eid, etype, doc_id, source_time, content, metadata)
