"""The Postgres schema, created and migrated by the code (``migrate``), all under schema ``rag``.

Bookkeeping tables are shared; the serving data lives in *generations*: each generation owns two
tables, ``g<N>_items`` (one row per chunk with its vector, HNSW-indexed) and ``g<N>_docs`` (one row
per document with its metadata). Readers query the view ``rag.items``, which joins the live
generation's two tables; switching generations replaces the view in one transaction, so a reader
sees the old or the new index, never a mix.

Metadata sits in ``g<N>_docs`` rather than on every chunk row because an UPDATE of a row in an
HNSW-indexed table costs an index insertion (pgvector#875): a metadata-only change then rewrites one
narrow row per document and never touches the vector table.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

SCHEMA_VERSION = 1
LOCK_NAMESPACE = 0x52414731  # advisory-lock namespace for per-shard locks ("RAG1")
MIGRATE_LOCK = 0x52414730

DDL = [
    "CREATE EXTENSION IF NOT EXISTS vector",
    "CREATE SCHEMA IF NOT EXISTS rag",
    """CREATE TABLE IF NOT EXISTS rag.settings (
        key text PRIMARY KEY,
        value jsonb NOT NULL)""",
    # The manifest: what the index is built from, one row per document.
    """CREATE TABLE IF NOT EXISTS rag.manifest (
        doc_id text COLLATE "C" PRIMARY KEY,
        shard smallint NOT NULL,
        source text NOT NULL,
        content_hash text NOT NULL,
        meta_hash text NOT NULL,
        size bigint NOT NULL,
        mtime_ns bigint NOT NULL,
        metadata jsonb NOT NULL,
        source_time timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now())""",
    "CREATE INDEX IF NOT EXISTS manifest_shard ON rag.manifest (shard)",
    # Normalised document bodies: chunking reads these, so chunks always match the manifest,
    # and documents pushed by webhooks (no file to re-read) live here too.
    """CREATE TABLE IF NOT EXISTS rag.document_bodies (
        doc_id text COLLATE "C" PRIMARY KEY,
        body text NOT NULL)""",
    # What the chunk table reflects, per document (the chunk stage's own state).
    """CREATE TABLE IF NOT EXISTS rag.chunk_docs (
        doc_id text COLLATE "C" PRIMARY KEY,
        shard smallint NOT NULL,
        content_hash text NOT NULL,
        meta_hash text NOT NULL,
        metadata jsonb NOT NULL,
        chunker_version text NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS chunk_docs_shard ON rag.chunk_docs (shard)",
    """CREATE TABLE IF NOT EXISTS rag.chunks (
        doc_id text COLLATE "C" NOT NULL,
        seq integer NOT NULL,
        shard smallint NOT NULL,
        chunk_hash text COLLATE "C" NOT NULL,
        text text NOT NULL,
        char_start integer NOT NULL,
        char_end integer NOT NULL,
        n_tokens integer NOT NULL,
        PRIMARY KEY (doc_id, seq))""",
    "CREATE INDEX IF NOT EXISTS chunks_shard ON rag.chunks (shard)",
    # Per-shard versions: each stage records the upstream version it reflects, so a stage that
    # crashed or never ran is found by comparing versions (level-triggered, not event-triggered).
    """CREATE TABLE IF NOT EXISTS rag.shard_state (
        shard smallint PRIMARY KEY,
        manifest_version text NOT NULL DEFAULT '',
        chunks_version text NOT NULL DEFAULT '',
        updated_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS rag.embedders (
        id serial PRIMARY KEY,
        fingerprint text UNIQUE NOT NULL,
        provider text NOT NULL,
        model text NOT NULL,
        dims integer NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now())""",
    # The embedding cache: content-addressed, so any generation, shard or document reuses it.
    """CREATE TABLE IF NOT EXISTS rag.embedding_cache (
        embedder_id integer NOT NULL REFERENCES rag.embedders(id),
        chunk_hash text COLLATE "C" NOT NULL,
        embedding vector NOT NULL,
        n_tokens integer NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (embedder_id, chunk_hash))""",
    """CREATE TABLE IF NOT EXISTS rag.generations (
        id serial PRIMARY KEY,
        embedder_id integer NOT NULL REFERENCES rag.embedders(id),
        chunker_version text NOT NULL,
        dims integer NOT NULL,
        state text NOT NULL CHECK (state IN ('building', 'ready', 'live', 'retired', 'dropped')),
        origin text NOT NULL DEFAULT 'index',
        created_at timestamptz NOT NULL DEFAULT now(),
        live_since timestamptz,
        retired_at timestamptz)""",
    """CREATE TABLE IF NOT EXISTS rag.live (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        generation integer NOT NULL REFERENCES rag.generations(id),
        switched_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS rag.generation_shards (
        generation integer NOT NULL REFERENCES rag.generations(id),
        shard smallint NOT NULL,
        chunks_version text NOT NULL,
        synced_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (generation, shard))""",
    # Webhook inbox: every accepted event is committed here before the 2xx answer. The event id
    # is the idempotency key; the manifest stage of the event's shard consumes it (applied_at).
    """CREATE TABLE IF NOT EXISTS rag.inbox (
        seq bigserial PRIMARY KEY,
        event_id text NOT NULL UNIQUE,
        event_type text NOT NULL CHECK (event_type IN ('document.created', 'document.updated', 'document.deleted')),
        doc_id text COLLATE "C" NOT NULL,
        shard smallint NOT NULL,
        source_time timestamptz NOT NULL,
        content text,
        metadata jsonb NOT NULL DEFAULT '{}',
        received_at timestamptz NOT NULL DEFAULT now(),
        applied_at timestamptz,
        outcome text)""",
    "CREATE INDEX IF NOT EXISTS inbox_pending ON rag.inbox (shard, seq) WHERE applied_at IS NULL",
    # Deleted webhook documents remember when they were deleted, so an older update that arrives
    # late cannot resurrect them (newest source time wins).
    """CREATE TABLE IF NOT EXISTS rag.tombstones (
        doc_id text COLLATE "C" PRIMARY KEY,
        source_time timestamptz NOT NULL)""",
    # One row per stage run (a CLI refresh, or one Dagster asset step): what `status` and `cost` read.
    """CREATE TABLE IF NOT EXISTS rag.runs (
        id bigserial PRIMARY KEY,
        run_id text NOT NULL,
        kind text NOT NULL,
        stage text NOT NULL,
        shards smallint[] NOT NULL DEFAULT '{}',
        started_at timestamptz NOT NULL,
        finished_at timestamptz NOT NULL DEFAULT now(),
        embedder text NOT NULL DEFAULT '',
        model text NOT NULL DEFAULT '',
        tokens_embedded bigint NOT NULL DEFAULT 0,
        tokens_full_reembed bigint NOT NULL DEFAULT 0,
        price_per_mtok double precision NOT NULL DEFAULT 0,
        cost_usd double precision NOT NULL DEFAULT 0,
        cost_avoided_usd double precision NOT NULL DEFAULT 0,
        stats jsonb NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS runs_run_id ON rag.runs (run_id)",
    "CREATE INDEX IF NOT EXISTS runs_started ON rag.runs (started_at)",
]


def migrate(conn: psycopg.Connection) -> None:
    """Create or upgrade the schema. Safe to call from many processes at once (advisory lock)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        for stmt in DDL:
            conn.execute(stmt)
        conn.execute(
            "INSERT INTO rag.settings (key, value) VALUES ('schema_version', %s::jsonb) "
            "ON CONFLICT (key) DO NOTHING",
            (str(SCHEMA_VERSION),),
        )
        row = conn.execute("SELECT value FROM rag.settings WHERE key = 'schema_version'").fetchone()
        if row and int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {row[0]} is newer than this rag_assets ({SCHEMA_VERSION}); upgrade rag_assets"
            )


def items_table(gen: int) -> sql.Identifier:
    return sql.Identifier("rag", f"g{gen}_items")


def docs_table(gen: int) -> sql.Identifier:
    return sql.Identifier("rag", f"g{gen}_docs")


def create_generation_tables(conn: psycopg.Connection, gen: int, dims: int) -> None:
    """Tables of a new generation, without the HNSW index: bulk loads build it afterwards."""
    conn.execute(
        sql.SQL(
            """CREATE TABLE {items} (
                chunk_id text COLLATE "C" NOT NULL,
                doc_id text COLLATE "C" NOT NULL,
                shard smallint NOT NULL,
                seq integer NOT NULL,
                chunk_hash text COLLATE "C" NOT NULL,
                text text NOT NULL,
                embedding vector({dims}) NOT NULL,
                PRIMARY KEY (doc_id, seq))"""
        ).format(items=items_table(gen), dims=sql.Literal(dims))
    )
    conn.execute(
        sql.SQL("CREATE INDEX {name} ON {items} (shard)").format(
            name=sql.Identifier(f"g{gen}_items_shard"), items=items_table(gen)
        )
    )
    conn.execute(
        sql.SQL(
            """CREATE TABLE {docs} (
                doc_id text COLLATE "C" PRIMARY KEY,
                shard smallint NOT NULL,
                meta_hash text NOT NULL,
                metadata jsonb NOT NULL)"""
        ).format(docs=docs_table(gen))
    )
    conn.execute(
        sql.SQL("CREATE INDEX {name} ON {docs} (shard)").format(
            name=sql.Identifier(f"g{gen}_docs_shard"), docs=docs_table(gen)
        )
    )
    conn.execute(
        sql.SQL("CREATE INDEX {name} ON {docs} USING gin (metadata jsonb_path_ops)").format(
            name=sql.Identifier(f"g{gen}_docs_meta"), docs=docs_table(gen)
        )
    )


def create_vector_index(conn: psycopg.Connection, gen: int) -> None:
    """HNSW (cosine) on a generation's vectors; built once after the bulk load."""
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {name} ON {items} USING hnsw (embedding vector_cosine_ops)"
        ).format(name=sql.Identifier(f"g{gen}_items_hnsw"), items=items_table(gen))
    )


def drop_generation_tables(conn: psycopg.Connection, gen: int) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(items_table(gen)))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(docs_table(gen)))


def point_view_at(conn: psycopg.Connection, gen: int) -> None:
    """(Re)define ``rag.items`` over generation ``gen``. Call inside the switching transaction."""
    conn.execute(
        sql.SQL(
            """CREATE OR REPLACE VIEW rag.items AS
               SELECT i.chunk_id, i.doc_id, i.shard, i.seq, i.text, d.metadata, i.embedding,
                      {gen}::integer AS generation
               FROM {items} i JOIN {docs} d ON d.doc_id = i.doc_id"""
        ).format(gen=sql.Literal(gen), items=items_table(gen), docs=docs_table(gen))
    )
