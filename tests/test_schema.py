"""Schema migration under concurrency: a process that waited for the migration lock while another
migrated runs no DDL (before, it re-ran every CREATE ... IF NOT EXISTS, whose locks queue behind
other runs' writes: the deadlock the e2e tests used to wait out)."""

from __future__ import annotations

import threading

import psycopg
import pytest

from rag_assets.store import schema


def test_migrate_rechecks_the_schema_after_taking_its_lock(db_url):
    first = psycopg.connect(db_url, autocommit=True)
    holder = psycopg.connect(db_url, autocommit=True)
    writer = psycopg.connect(db_url, autocommit=True)
    waiter = psycopg.connect(db_url, autocommit=True)
    try:
        # The lock is held while "another process" migrates; our process waits on it.
        holder.execute("SELECT pg_advisory_lock(%s)", (schema.MIGRATE_LOCK,))
        errors: list[BaseException] = []

        def run():
            try:
                waiter.execute("SET lock_timeout = '3s'")
                schema.migrate(waiter)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        # The other process completes the migration (DDL and digest), then releases the lock...
        for stmt in schema._ddl("rag"):
            first.execute(stmt)
        first.execute(
            "INSERT INTO rag.settings (key, value) VALUES ('schema_ddl', to_jsonb(%s::text)), "
            "('schema_version', %s::jsonb) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (schema.DDL_DIGEST, str(schema.SCHEMA_VERSION)),
        )
        # ...while a run writes to the chunk table in a long transaction.
        writer.execute("BEGIN")
        writer.execute("LOCK TABLE rag.chunks IN ROW EXCLUSIVE MODE")
        holder.execute("SELECT pg_advisory_unlock(%s)", (schema.MIGRATE_LOCK,))
        t.join(timeout=30)
        assert not t.is_alive()
        assert not errors, errors  # before: LockNotAvailable on CREATE INDEX ... ON rag.chunks
        writer.execute("COMMIT")
    finally:
        for c in (first, holder, writer, waiter):
            c.close()


def test_migrate_is_idempotent_and_refuses_a_newer_schema(db_url):
    with psycopg.connect(db_url, autocommit=True) as c:
        schema.migrate(c)
        schema.migrate(c)
        c.execute("UPDATE rag.settings SET value = '99'::jsonb WHERE key = 'schema_version'")
        with pytest.raises(RuntimeError, match="newer than this rag_assets"):
            schema.migrate(c)
