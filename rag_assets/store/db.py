"""Connections, and the per-shard locks that serialise the stages touching one shard."""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from rag_assets.redact import redact_url, scrub
from rag_assets.settings import Settings
from rag_assets.store.embedded import embedded_url
from rag_assets.store.schema import CACHE_SCHEMA, DEFAULT_SCHEMA, migrate
from rag_assets.store.server_check import ensure_checked

_checked: set[str] = set()
_migrated: set[tuple[str, str]] = set()


def database_url(settings: Settings) -> str:
    """``RAG_DATABASE_URL``, or the embedded server under ``RAG_HOME``."""
    return settings.database_url or embedded_url(settings.home)


def connect_index(settings: Settings, *, autocommit: bool = True) -> psycopg.Connection:
    """A connection to the index ``settings`` describe: its database, with ``search_path`` at its schema."""
    return connect(database_url(settings), schema=settings.pg_schema, autocommit=autocommit)


def search_path_sql(conn: psycopg.Connection, schema: str) -> sql.Composed:
    """``SET search_path``: the index schema first, then the shared cache and pgvector's schema.

    Every statement in the code names its tables unqualified, so this one setting decides which
    index a connection reads and writes. pgvector's schema is looked up (managed servers install
    extensions in a schema of their own, e.g. ``extensions``) so that the ``vector`` type resolves.
    """
    row = conn.execute(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'"
    ).fetchone()
    path = dict.fromkeys([schema, CACHE_SCHEMA, *([row[0]] if row else []), "public"])  # ordered, no repeats
    return sql.SQL("SET search_path TO {}").format(sql.SQL(", ").join(sql.Identifier(p) for p in path))


def connect(
    url: str, *, schema: str = DEFAULT_SCHEMA, autocommit: bool = True, ensure_schema: bool = True
) -> psycopg.Connection:
    """Open a connection to one index schema, pgvector types registered; migrate once per (URL, schema).

    Autocommit by default: every multi-statement change is an explicit ``conn.transaction()``
    block, so a stage's locks and writes last exactly as long as its transaction, never longer.
    """
    try:
        conn = psycopg.connect(url, autocommit=True)
    except psycopg.OperationalError as e:
        raise ConnectionError(f"cannot connect to PostgreSQL ({_redact(url)}): {scrub(str(e), url)}".strip()) from None
    except psycopg.ProgrammingError:  # a malformed URL: libpq's message quotes it, password and all
        raise ConnectionError(
            f"RAG_DATABASE_URL is not a valid PostgreSQL URL or key=value string ({_redact(url)})"
        ) from None
    if url not in _checked:
        # Once per server process: pgvector present, recent, and computing on this CPU.
        try:
            ensure_checked(url)
        except BaseException:
            conn.close()
            raise
        _checked.add(url)
    if ensure_schema and (url, schema) not in _migrated:
        migrate(conn, schema)
        _migrated.add((url, schema))
    conn.execute(search_path_sql(conn, schema))
    register_vector(conn)
    conn.autocommit = autocommit
    return conn


def _redact(url: str) -> str:
    """A URL without its password, for error messages."""
    return redact_url(url) or ""


def lock_shards(conn: psycopg.Connection, shards: Iterable[int]) -> None:
    """Transaction-scoped advisory locks, taken in shard order so two writers cannot deadlock."""
    for s in sorted(set(shards)):
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':shard'), %s)", (s,))


ANALYZE_AFTER_ROWS = 200


def analyze_if_changed(conn: psycopg.Connection, table: str, rows_changed: int) -> None:
    """Refresh planner statistics after a bulk change.

    Autovacuum analyzes only after a delay; until then a table that just grew from 0 to 10k rows
    looks empty to the planner, and the anti-joins of the next sync become nested loops (measured:
    2.7 s instead of 20 ms for a 7k-chunk shard set). ANALYZE samples at most 30k rows, so it costs
    milliseconds; skip it for small incremental changes.
    """
    if rows_changed >= ANALYZE_AFTER_ROWS:
        conn.execute(f"ANALYZE {table}")
