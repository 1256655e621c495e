"""The one shard-count rule: an index's shard count is fixed when it is first written.

Changing it would move every document to another shard, so the first writer (an index run, the
first webhook event, a restore) pins it in the index's ``settings`` table and every later writer
must agree. Range checks of the value itself live in ``settings.check_shards``.
"""

from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb

from rag_assets.settings import SettingsError, check_shards


class ShardCountError(SettingsError):
    """A writer's shard count differs from the one the index was built with."""


def stored_shard_count(conn: psycopg.Connection) -> int | None:
    row = conn.execute("SELECT value FROM settings WHERE key = 'shards'").fetchone()
    return int(row[0]) if row else None


def pin_shard_count(conn: psycopg.Connection, n_shards: int) -> int:
    """The index's shard count, pinned to ``n_shards`` when none is recorded yet."""
    check_shards(n_shards)
    stored = stored_shard_count(conn)
    if stored is not None:
        return stored
    conn.execute(
        "INSERT INTO settings (key, value) VALUES ('shards', %s) ON CONFLICT DO NOTHING", (Jsonb(n_shards),)
    )
    if not conn.autocommit:
        conn.commit()
    stored = stored_shard_count(conn)
    return stored if stored is not None else n_shards


def require_shard_count(conn: psycopg.Connection, n_shards: int) -> None:
    """Pin ``n_shards``, or refuse when the index was built with another count."""
    stored = pin_shard_count(conn, n_shards)
    if stored != n_shards:
        raise ShardCountError(
            f"RAG_SHARDS={n_shards} but this index was built with {stored} shards; "
            "use the same value (changing it would move every document)"
        )
