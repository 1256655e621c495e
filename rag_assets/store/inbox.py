"""The webhook inbox: accepted events are committed here before the receiver answers 2xx.

The event id is the idempotency key (``rag.inbox.event_id`` is UNIQUE): a redelivered event is
acknowledged and stored once. Applying events to the index (newest source time wins, tombstones)
is the manifest stage's job, not this module's.
"""

from __future__ import annotations

from typing import Protocol

import psycopg
from psycopg.types.json import Jsonb

from rag_assets.manifest import shard_of

DEFAULT_SHARDS = 64  # Settings.shards' default, used only when nothing else says


class InboxEvent(Protocol):
    event_id: str
    type: str
    doc_id: str
    source_time: object  # datetime (aware)
    content: str | None
    metadata: dict


def shard_count(conn: psycopg.Connection, default: int) -> int:
    """The index's shard count: the ``rag.settings`` row ``shards``, pinned to ``default`` if absent.

    Events are stored with their shard, so the first event fixes the shard count the same way the
    first index run does (``pipeline.check_shard_count``); a later run with another RAG_SHARDS is
    refused there rather than silently mis-sharding the inbox.
    """
    row = conn.execute("SELECT value FROM rag.settings WHERE key = 'shards'").fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO rag.settings (key, value) VALUES ('shards', %s) ON CONFLICT DO NOTHING",
            (Jsonb(default),),
        )
        if not conn.autocommit:
            conn.commit()
        row = conn.execute("SELECT value FROM rag.settings WHERE key = 'shards'").fetchone()
    return int(row[0]) if row else default


_INSERT = """
WITH ins AS (
    INSERT INTO rag.inbox (event_id, event_type, doc_id, shard, source_time, content, metadata)
    VALUES (%(event_id)s, %(type)s, %(doc_id)s, %(shard)s, %(source_time)s, %(content)s, %(metadata)s)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING seq)
SELECT seq, false FROM ins
UNION ALL
SELECT seq, true FROM rag.inbox WHERE event_id = %(event_id)s AND NOT EXISTS (SELECT 1 FROM ins)
"""


def insert_event(
    conn: psycopg.Connection, event: InboxEvent, n_shards: int | None = None
) -> tuple[int, bool]:
    """Store ``event`` durably, once. Returns ``(seq, duplicate)``.

    One statement, committed before returning (an autocommit connection commits it; otherwise we
    commit). ``duplicate`` is True when an event with the same id was already stored (its ``seq``
    is returned). ``n_shards`` defaults to :func:`shard_count`.
    """
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
                "SELECT seq, true FROM rag.inbox WHERE event_id = %s", (event.event_id,)
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
    return int(conn.execute("SELECT count(*) FROM rag.inbox WHERE applied_at IS NULL").fetchone()[0])


def inbox_lag_seconds(conn: psycopg.Connection) -> float:
    """Age in seconds of the oldest unapplied event (0 when none is pending)."""
    row = conn.execute(
        "SELECT extract(epoch FROM clock_timestamp() - min(received_at)) FROM rag.inbox WHERE applied_at IS NULL"
    ).fetchone()
    return max(0.0, float(row[0])) if row and row[0] is not None else 0.0


def inbox_stats(conn: psycopg.Connection) -> tuple[int, float]:
    """``(pending_count, lag_seconds)`` in one round trip (for /metrics)."""
    row = conn.execute(
        """SELECT count(*), extract(epoch FROM clock_timestamp() - min(received_at))
           FROM rag.inbox WHERE applied_at IS NULL"""
    ).fetchone()
    return int(row[0]), (max(0.0, float(row[1])) if row[1] is not None else 0.0)
