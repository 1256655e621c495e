"""The webhook inbox: accepted events are committed here before the receiver answers 2xx.

The event id is the idempotency key (``inbox.event_id`` is UNIQUE): a redelivered event is
acknowledged and stored once. Applying events to the index (newest source time wins, tombstones)
is the manifest stage's job, not this module's.

What may enter the inbox is defined here, once, for the HTTP receiver and the apply side alike:
:func:`source_time_problem` (a source time every later stage can store: an aware date-time whose
nanosecond ``mtime`` fits in 64 bits) and :func:`doc_id_problem` (a canonical relative path, as
the folder source produces, so a webhook id cannot spell a folder document differently).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol

import psycopg
from psycopg.types.json import Jsonb

from rag_assets.manifest import shard_of
from rag_assets.store.shard_count import pin_shard_count

DEFAULT_SHARDS = 64  # Settings.shards' default, used only when nothing else says

# Source times must fit a 64-bit count of nanoseconds since 1970 (manifest.mtime_ns, the Parquet
# snapshots): 1677-09-21 .. 2262-04-11. The receiver also refuses anything before 1970 (no source
# changed a document before the epoch) or later than its clock plus RAG_WEBHOOK_TOLERANCE_S.
SOURCE_TIME_MIN = datetime(1970, 1, 1, tzinfo=UTC)
SOURCE_TIME_MAX = datetime(2262, 1, 1, tzinfo=UTC)
USABLE_TIME_MIN = datetime(1678, 1, 1, tzinfo=UTC)  # what the apply side can still store


class InboxError(ValueError):
    """An event the inbox refuses to store (the message names the event and the field)."""


def source_time_problem(value: object, *, lo: datetime = SOURCE_TIME_MIN) -> str | None:
    """Why ``value`` cannot be an event's source time, or None when it can."""
    if not isinstance(value, datetime):
        return f"source time must be a date-time, not {type(value).__name__}"
    if value.tzinfo is None or value.utcoffset() is None:
        return "source time needs a timezone"
    try:
        utc = value.astimezone(UTC)
    except (OverflowError, ValueError):
        return "source time is out of range"
    if utc < lo:
        return f"source time {utc.isoformat()} is before {lo.date().isoformat()}"
    if utc >= SOURCE_TIME_MAX:
        return f"source time {utc.isoformat()} is after {SOURCE_TIME_MAX.year}"
    return None


def doc_id_problem(doc_id: str) -> str | None:
    """Why ``doc_id`` is not a canonical relative path (``a/b.md``), or None when it is.

    Folder ids are normalised relative paths; an id with an empty, ``.`` or ``..`` segment (``./a.md``,
    ``a//b.md``, ``a/``, ``/a.md``, ``a/../b.md``) names the same file differently, or a file outside
    the source, and would slip past the check that keeps webhook and folder documents apart.
    """
    segments = doc_id.split("/")
    if "" in segments:
        return "has an empty segment (a leading, trailing or doubled '/')"
    if "." in segments:
        return "has a '.' segment"
    if ".." in segments:
        return "has a '..' segment"
    return None


class InboxEvent(Protocol):
    event_id: str
    type: str
    doc_id: str
    source_time: object  # datetime (aware)
    content: str | None
    metadata: dict


def shard_count(conn: psycopg.Connection, default: int) -> int:
    """The index's shard count, pinned to ``default`` if absent: the first event fixes it the same
    way the first index run does, and a later run with another RAG_SHARDS is refused there rather
    than silently mis-sharding the inbox."""
    return pin_shard_count(conn, default)


_INSERT = """
WITH ins AS (
    INSERT INTO inbox (event_id, event_type, doc_id, shard, source_time, content, metadata)
    VALUES (%(event_id)s, %(type)s, %(doc_id)s, %(shard)s, %(source_time)s, %(content)s, %(metadata)s)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING seq)
SELECT seq, false FROM ins
UNION ALL
SELECT seq, true FROM inbox WHERE event_id = %(event_id)s AND NOT EXISTS (SELECT 1 FROM ins)
"""


def insert_event(
    conn: psycopg.Connection, event: InboxEvent, n_shards: int | None = None
) -> tuple[int, bool]:
    """Store ``event`` durably, once. Returns ``(seq, duplicate)``.

    One statement, committed before returning (an autocommit connection commits it; otherwise we
    commit). ``duplicate`` is True when an event with the same id was already stored (its ``seq``
    is returned). ``n_shards`` defaults to :func:`shard_count`. Raises :class:`InboxError` for a
    source time or id the apply side could not use (see the module docstring).
    """
    problem = source_time_problem(event.source_time) or (
        f"doc_id {event.doc_id!r} {p}" if (p := doc_id_problem(event.doc_id)) else None
    )
    if problem:
        raise InboxError(f"event {event.event_id!r}: {problem}")
    n = n_shards if n_shards is not None else shard_count(conn, DEFAULT_SHARDS)
    params = {
        "event_id": event.event_id,
        "type": event.type,
        "doc_id": event.doc_id,
        "shard": shard_of(event.doc_id, n),
        "source_time": event.source_time,
        "content": event.content,
        "metadata": Jsonb(event.metadata or {}),
    }
    for _ in range(10):
        row = conn.execute(_INSERT, params).fetchone()
        if row is None:
            # A concurrent insert of the same id committed after this statement's snapshot: the
            # conflict skipped our row but the snapshot cannot see theirs. Look again.
            row = conn.execute(
                "SELECT seq, true FROM inbox WHERE event_id = %s", (event.event_id,)
            ).fetchone()
        if row is not None:
            if not conn.autocommit:
                conn.commit()
            return int(row[0]), bool(row[1])
    raise RuntimeError(
        f"event {event.event_id!r}: could not insert nor find it in the inbox"
    )  # pragma: no cover


def pending_count(conn: psycopg.Connection) -> int:
    """Events not applied yet."""
    return int(conn.execute("SELECT count(*) FROM inbox WHERE applied_at IS NULL").fetchone()[0])


def inbox_lag_seconds(conn: psycopg.Connection) -> float:
    """Age in seconds of the oldest unapplied event (0 when none is pending)."""
    row = conn.execute(
        "SELECT extract(epoch FROM clock_timestamp() - min(received_at)) FROM inbox WHERE applied_at IS NULL"
    ).fetchone()
    return max(0.0, float(row[0])) if row and row[0] is not None else 0.0


def inbox_stats(conn: psycopg.Connection) -> tuple[int, float]:
    """``(pending_count, lag_seconds)`` in one round trip (for /metrics)."""
    row = conn.execute(
        """SELECT count(*), extract(epoch FROM clock_timestamp() - min(received_at))
           FROM inbox WHERE applied_at IS NULL"""
    ).fetchone()
    return int(row[0]), (max(0.0, float(row[1])) if row[1] is not None else 0.0)
