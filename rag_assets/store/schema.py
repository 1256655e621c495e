"""The Postgres schema of one index, created and migrated by the code (``migrate``).

Each index owns one Postgres schema (``rag`` for the default index; ``RAG_PG_SCHEMA`` / the
component's ``pg_schema``). Connections set ``search_path`` to it (``store.db.connect``), so every
statement in the code names its tables unqualified and reaches that index's tables only; the DDL
below qualifies them explicitly. The embedding cache (``embedders``, ``embedding_cache``) lives in
the shared schema ``rag_cache``: a text embedded once per embedder serves every index of the database.


Bookkeeping tables are shared; the serving data lives in *generations*: each generation owns three
tables, ``g<N>_items`` (one row per chunk with its text and vector, HNSW-indexed, never updated),
``g<N>_pos`` (each chunk's position ``seq`` in its document) and ``g<N>_docs`` (one row per document
with its metadata). Readers query the view ``items``, which joins the live generation's tables;
switching generations replaces the view in one transaction, so a reader sees the old or the new
index, never a mix.

Positions and metadata sit in narrow tables because an UPDATE of a row in an HNSW-indexed table
costs an index insertion (pgvector#875): a metadata-only change rewrites one narrow row per
document, a chunk that moved updates one narrow row, and neither touches the vector table.
"""

from __future__ import annotations

import hashlib
import logging

import psycopg
from psycopg import sql

SCHEMA_VERSION = 1
DEFAULT_SCHEMA = "rag"
MIGRATE_LOCK = 0x52414730  # one lock for every schema: migrations also create the shared cache

DDL = [
    "CREATE EXTENSION IF NOT EXISTS vector",
    "CREATE SCHEMA IF NOT EXISTS {s}",
    "CREATE SCHEMA IF NOT EXISTS rag_cache",
    """CREATE TABLE IF NOT EXISTS {s}.settings (
        key text PRIMARY KEY,
        value jsonb NOT NULL)""",
    # The manifest: what the index is built from, one row per document.
    """CREATE TABLE IF NOT EXISTS {s}.manifest (
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
    "CREATE INDEX IF NOT EXISTS manifest_shard ON {s}.manifest (shard)",
    # Normalised document bodies: chunking reads these, so chunks always match the manifest,
    # and documents pushed by webhooks (no file to re-read) live here too.
    """CREATE TABLE IF NOT EXISTS {s}.document_bodies (
        doc_id text COLLATE "C" PRIMARY KEY,
        body text NOT NULL)""",
    # What the chunk table reflects, per document (the chunk stage's own state).
    """CREATE TABLE IF NOT EXISTS {s}.chunk_docs (
        doc_id text COLLATE "C" PRIMARY KEY,
        shard smallint NOT NULL,
        content_hash text NOT NULL,
        meta_hash text NOT NULL,
        metadata jsonb NOT NULL,
        chunker_version text NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS chunk_docs_shard ON {s}.chunk_docs (shard)",
    # chunk_id = H(doc_id, chunk_hash, k-th occurrence in the document): stable when a chunk only
    # moves (its seq changes), so the serving row is updated in place (a HOT update, no HNSW
    # insertion) instead of being deleted and re-inserted.
    """CREATE TABLE IF NOT EXISTS {s}.chunks (
        doc_id text COLLATE "C" NOT NULL,
        seq integer NOT NULL,
        shard smallint NOT NULL,
        chunk_id text COLLATE "C" NOT NULL,
        chunk_hash text COLLATE "C" NOT NULL,
        text text NOT NULL,
        char_start integer NOT NULL,
        char_end integer NOT NULL,
        n_tokens integer NOT NULL,
        PRIMARY KEY (doc_id, seq))""",
    "CREATE INDEX IF NOT EXISTS chunks_shard ON {s}.chunks (shard)",
    "CREATE UNIQUE INDEX IF NOT EXISTS chunks_chunk_id ON {s}.chunks (chunk_id)",
    # Source files that failed to read, with the stat they had: not re-read (nor made stale) until
    # they change, and reported in every run's errors until fixed or deleted.
    """CREATE TABLE IF NOT EXISTS {s}.source_errors (
        doc_id text COLLATE "C" PRIMARY KEY,
        source text NOT NULL,
        size bigint NOT NULL,
        mtime_ns bigint NOT NULL,
        error text NOT NULL,
        seen_at timestamptz NOT NULL DEFAULT now())""",
    # Per-shard versions: each stage records the upstream version it reflects, so a stage that
    # crashed or never ran is found by comparing versions (level-triggered, not event-triggered).
    """CREATE TABLE IF NOT EXISTS {s}.shard_state (
        shard smallint PRIMARY KEY,
        manifest_version text NOT NULL DEFAULT '',
        chunks_version text NOT NULL DEFAULT '',
        updated_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS rag_cache.embedders (
        id serial PRIMARY KEY,
        fingerprint text UNIQUE NOT NULL,
        provider text NOT NULL,
        model text NOT NULL,
        dims integer NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now())""",
    # The embedding cache: content-addressed, so any generation, shard or document reuses it.
    """CREATE TABLE IF NOT EXISTS rag_cache.embedding_cache (
        embedder_id integer NOT NULL REFERENCES rag_cache.embedders(id),
        chunk_hash text COLLATE "C" NOT NULL,
        embedding vector NOT NULL,
        n_tokens integer NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (embedder_id, chunk_hash))""",
    """CREATE TABLE IF NOT EXISTS {s}.generations (
        id serial PRIMARY KEY,
        embedder_id integer NOT NULL REFERENCES rag_cache.embedders(id),
        chunker_version text NOT NULL,
        dims integer NOT NULL,
        state text NOT NULL CHECK (state IN ('building', 'ready', 'live', 'retired', 'dropped')),
        origin text NOT NULL DEFAULT 'index',
        created_at timestamptz NOT NULL DEFAULT now(),
        live_since timestamptz,
        retired_at timestamptz)""",
    """CREATE TABLE IF NOT EXISTS {s}.live (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        generation integer NOT NULL REFERENCES {s}.generations(id),
        switched_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS {s}.generation_shards (
        generation integer NOT NULL REFERENCES {s}.generations(id),
        shard smallint NOT NULL,
        chunks_version text NOT NULL,
        synced_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (generation, shard))""",
    # Webhook inbox: every accepted event is committed here before the 2xx answer. The event id
    # is the idempotency key; the manifest stage of the event's shard consumes it (applied_at).
    """CREATE TABLE IF NOT EXISTS {s}.inbox (
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
    "CREATE INDEX IF NOT EXISTS inbox_pending ON {s}.inbox (shard, seq) WHERE applied_at IS NULL",
    # Deleted webhook documents remember when they were deleted, so an older update that arrives
    # late cannot resurrect them (newest source time wins).
    """CREATE TABLE IF NOT EXISTS {s}.tombstones (
        doc_id text COLLATE "C" PRIMARY KEY,
        source_time timestamptz NOT NULL)""",
    # One row per stage run (a CLI refresh, or one Dagster asset step): what `status` and `cost` read.
    """CREATE TABLE IF NOT EXISTS {s}.runs (
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
    "CREATE INDEX IF NOT EXISTS runs_run_id ON {s}.runs (run_id)",
    "CREATE INDEX IF NOT EXISTS runs_started ON {s}.runs (started_at)",
    # The parse cache (rag_assets/formats/cache.py): Markdown of a binary document (PDF, Office, HTML)
    # per (SHA-256 of its raw bytes, converter name + version + options), shared by every index.
    """CREATE TABLE IF NOT EXISTS rag_cache.parse_cache (
        content_sha256 text COLLATE "C" NOT NULL,
        converter_key text COLLATE "C" NOT NULL,
        converter text NOT NULL,
        converter_version text NOT NULL,
        text text NOT NULL,
        page_numbers integer[] NOT NULL,
        page_starts integer[] NOT NULL,
        page_ends integer[] NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (content_sha256, converter_key))""",
    # A failing object's change token beyond (size, mtime_ns): its ETag and version id (sources/s3.py),
    # so a broken object rewritten within the same second is read again. NULL for files.
    "ALTER TABLE {s}.source_errors ADD COLUMN IF NOT EXISTS token text",
]


DDL_DIGEST = hashlib.sha256("\n".join(DDL).encode()).hexdigest()


CACHE_SCHEMA = "rag_cache"  # the embedding cache, shared by every index of one database


def _ddl(schema: str) -> list[str]:
    """The DDL for one index schema (``{s}`` stands for the quoted schema name)."""
    ident = '"' + schema.replace('"', '""') + '"'
    return [stmt.replace("{s}", ident) for stmt in DDL]


def _schema_is_current(conn: psycopg.Connection, schema: str) -> bool:
    """True when the database already has exactly this DDL: a new process then runs no DDL at all.

    Running ``CREATE INDEX IF NOT EXISTS`` in every new run process takes locks that deadlocked with
    another run's writes when four range runs started together (tests/test_production.py).
    """
    if not conn.execute("SELECT to_regclass(%s)", (f'"{schema}".settings',)).fetchone()[0]:
        return False  # (checked, not caught: inside migrate's transaction an error would abort it)
    rows = dict(
        conn.execute(
            sql.SQL("SELECT key, value FROM {}.settings WHERE key IN ('schema_version', 'schema_ddl')").format(
                sql.Identifier(schema)
            )
        ).fetchall()
    )
    if rows.get("schema_version") is not None and int(rows["schema_version"]) > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {rows['schema_version']} is newer than this rag_assets ({SCHEMA_VERSION}); "
            "upgrade rag_assets"
        )
    return rows.get("schema_ddl") == DDL_DIGEST


def _adopt_legacy_cache(conn: psycopg.Connection, schema: str) -> None:
    """Move an index's own embedding cache (releases before several indexes per database) to ``rag_cache``.

    The first index to upgrade hands its tables over whole (``ALTER TABLE ... SET SCHEMA``: no rows
    copied, ids kept, so its generations' foreign keys stay valid). An index upgrading after the
    shared cache exists merges: embedders are matched by fingerprint, the generations re-pointed,
    cached vectors copied (existing entries win), and the old tables dropped.
    """
    s = sql.Identifier(schema)
    if not conn.execute("SELECT to_regclass(%s)", (f'"{schema}".embedders',)).fetchone()[0]:
        return
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {CACHE_SCHEMA}")
    if not conn.execute("SELECT to_regclass('rag_cache.embedders')").fetchone()[0]:
        conn.execute(sql.SQL("ALTER TABLE {}.embedders SET SCHEMA rag_cache").format(s))
        if conn.execute("SELECT to_regclass(%s)", (f'"{schema}".embedding_cache',)).fetchone()[0]:
            conn.execute(sql.SQL("ALTER TABLE {}.embedding_cache SET SCHEMA rag_cache").format(s))
        return
    conn.execute(
        sql.SQL(
            """INSERT INTO rag_cache.embedders (fingerprint, provider, model, dims, created_at)
               SELECT fingerprint, provider, model, dims, created_at FROM {}.embedders
               ON CONFLICT (fingerprint) DO NOTHING"""
        ).format(s)
    )
    fks = conn.execute(
        """SELECT conname FROM pg_constraint
           WHERE conrelid = to_regclass(%s) AND confrelid = to_regclass(%s) AND contype = 'f'""",
        (f'"{schema}".generations', f'"{schema}".embedders'),
    ).fetchall()
    for (name,) in fks:
        conn.execute(sql.SQL("ALTER TABLE {}.generations DROP CONSTRAINT {}").format(s, sql.Identifier(name)))
    if conn.execute("SELECT to_regclass(%s)", (f'"{schema}".generations',)).fetchone()[0]:
        conn.execute(
            sql.SQL(
                """UPDATE {s}.generations g SET embedder_id = n.id
                   FROM {s}.embedders o JOIN rag_cache.embedders n USING (fingerprint)
                   WHERE g.embedder_id = o.id"""
            ).format(s=s)
        )
        conn.execute(
            sql.SQL(
                "ALTER TABLE {}.generations ADD FOREIGN KEY (embedder_id) REFERENCES rag_cache.embedders(id)"
            ).format(s)
        )
    if conn.execute("SELECT to_regclass(%s)", (f'"{schema}".embedding_cache',)).fetchone()[0]:
        conn.execute(
            sql.SQL(
                """INSERT INTO rag_cache.embedding_cache (embedder_id, chunk_hash, embedding, n_tokens, created_at)
                   SELECT n.id, c.chunk_hash, c.embedding, c.n_tokens, c.created_at
                   FROM {s}.embedding_cache c JOIN {s}.embedders o ON o.id = c.embedder_id
                   JOIN rag_cache.embedders n USING (fingerprint)
                   ON CONFLICT DO NOTHING"""
            ).format(s=s)
        )
        conn.execute(sql.SQL("DROP TABLE {}.embedding_cache").format(s))
    conn.execute(sql.SQL("DROP TABLE {}.embedders").format(s))


def migrate(conn: psycopg.Connection, schema: str = DEFAULT_SCHEMA) -> None:
    """Create or upgrade one index's schema (and the shared cache). Safe from many processes at once."""
    if _schema_is_current(conn, schema):
        return
    s = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        # Check again under the lock: a process that waited here while another migrated must not
        # run the DDL again (its CREATE INDEX IF NOT EXISTS still takes locks that queue behind,
        # and deadlock with, the first process's writes).
        if _schema_is_current(conn, schema):
            return
        _adopt_legacy_cache(conn, schema)
        for stmt in _ddl(schema):
            conn.execute(stmt)
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.settings (key, value) VALUES ('schema_version', %s::jsonb) "
                "ON CONFLICT (key) DO NOTHING"
            ).format(s),
            (str(SCHEMA_VERSION),),
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.settings (key, value) VALUES ('schema_ddl', to_jsonb(%s::text)) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ).format(s),
            (DDL_DIGEST,),
        )
        row = conn.execute(
            sql.SQL("SELECT value FROM {}.settings WHERE key = 'schema_version'").format(s)
        ).fetchone()
        if row and int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {row[0]} is newer than this rag_assets ({SCHEMA_VERSION}); upgrade rag_assets"
            )


def lock_key(name: str) -> sql.Composed:
    """An advisory-lock key pair private to the connection's index schema (``current_schema()``)."""
    return sql.SQL("hashtext(current_schema() || {}), 0").format(sql.Literal(":" + name))


def items_table(gen: int) -> sql.Identifier:
    return sql.Identifier(f"g{gen}_items")


def pos_table(gen: int) -> sql.Identifier:
    return sql.Identifier(f"g{gen}_pos")


def docs_table(gen: int) -> sql.Identifier:
    return sql.Identifier(f"g{gen}_docs")


DEFAULT_TEXT_SEARCH_CONFIG = "english"
TSV_COLUMN = "tsv"


def check_text_search_config(conn: psycopg.Connection, name: str) -> str:
    """``name`` if the database has that text search configuration, else a ValueError naming the setting."""
    found = conn.execute(
        """SELECT 1 FROM pg_ts_config c JOIN pg_namespace n ON n.oid = c.cfgnamespace
           WHERE CASE WHEN strpos(%(n)s, '.') > 0 THEN n.nspname || '.' || c.cfgname = %(n)s
                      ELSE c.cfgname = %(n)s AND pg_ts_config_is_visible(c.oid) END""",
        {"n": name},
    ).fetchone()
    if not found:
        raise ValueError(
            f"RAG_TEXT_SEARCH_CONFIG={name!r}: the database has no such text search configuration "
            "(see \\dF in psql; e.g. english, simple)"
        )
    return name


def create_generation_tables(
    conn: psycopg.Connection,
    gen: int,
    dims: int,
    text_search_config: str = DEFAULT_TEXT_SEARCH_CONFIG,
    *,
    indexes: bool = True,
) -> None:
    """Tables of a new generation, without the HNSW index: bulk loads build it afterwards.

    ``items`` rows (text + vector, HNSW-indexed) are written once and never updated: in pgvector an
    UPDATE of any column of a wide row re-inserts it into the HNSW graph (measured: 1,277 moved
    chunks cost 0.75 s and 800k buffer hits). What changes without re-embedding lives in narrow
    tables: a chunk's position in its document (``pos``) and the document's metadata (``docs``).

    The chunk's full-text vector is a generated STORED column of ``items`` (GIN-indexed), computed
    from the text by ``text_search_config`` when the row is inserted: it depends on the text only,
    which never changes in a row, so it never causes an update; COPY (sync, restore) fills it without
    naming it, and a restore or rollback carries it with the generation's own table. The
    configuration is recorded as the column's comment, so queries parse user text the same way
    (:func:`generation_text_search_config`).

    ``indexes=False`` leaves out the secondary indexes (full text, shard, metadata): a rebuild that
    copies a whole generation in builds them once afterwards (:func:`create_generation_indexes`).
    """
    check_text_search_config(conn, text_search_config)
    conn.execute(
        sql.SQL(
            """CREATE TABLE {items} (
                chunk_id text COLLATE "C" PRIMARY KEY,
                doc_id text COLLATE "C" NOT NULL,
                shard smallint NOT NULL,
                chunk_hash text COLLATE "C" NOT NULL,
                text text NOT NULL,
                embedding vector({dims}) NOT NULL,
                {tsv} tsvector GENERATED ALWAYS AS (to_tsvector({cfg}::regconfig, text)) STORED)"""
        ).format(
            items=items_table(gen),
            dims=sql.Literal(dims),
            tsv=sql.Identifier(TSV_COLUMN),
            cfg=sql.Literal(text_search_config),
        )
    )
    conn.execute(
        sql.SQL("COMMENT ON COLUMN {items}.{tsv} IS {cfg}").format(
            items=items_table(gen), tsv=sql.Identifier(TSV_COLUMN), cfg=sql.Literal(text_search_config)
        )
    )
    conn.execute(
        sql.SQL(
            """CREATE TABLE {pos} (
                chunk_id text COLLATE "C" PRIMARY KEY,
                doc_id text COLLATE "C" NOT NULL,
                shard smallint NOT NULL,
                seq integer NOT NULL)"""
        ).format(pos=pos_table(gen))
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
    if indexes:
        create_generation_indexes(conn, gen)


def create_generation_indexes(conn: psycopg.Connection, gen: int) -> None:
    """The secondary indexes of a generation's tables (the HNSW index is :func:`create_vector_index`)."""
    conn.execute(
        sql.SQL("CREATE INDEX {name} ON {items} USING gin ({tsv})").format(
            name=sql.Identifier(f"g{gen}_items_tsv"), items=items_table(gen), tsv=sql.Identifier(TSV_COLUMN)
        )
    )
    for table, name in ((items_table(gen), "items"), (pos_table(gen), "pos"), (docs_table(gen), "docs")):
        conn.execute(
            sql.SQL("CREATE INDEX {name} ON {t} (shard)").format(
                name=sql.Identifier(f"g{gen}_{name}_shard"), t=table
            )
        )
    conn.execute(
        sql.SQL("CREATE INDEX {name} ON {docs} USING gin (metadata jsonb_path_ops)").format(
            name=sql.Identifier(f"g{gen}_docs_meta"), docs=docs_table(gen)
        )
    )


def hnsw_build_memory_mb(rows: int, dims: int, m: int = 16, cap_mb: int = 2048) -> int:
    """``maintenance_work_mem`` (MiB) that holds the whole HNSW graph of ``rows`` vectors while it is built.

    pgvector builds the graph in ``maintenance_work_mem`` and, once it no longer fits ("hnsw graph no
    longer fits into maintenance_work_mem"), inserts the remaining tuples on disk, several times slower:
    with the former fixed 512 MB, a 456k-row, 256-d build (the 100k-document backfill) averaged ~565
    rows/s over its first 407k rows, ~190 rows/s over the last 34k, and took 948 s in all.
    Per element we count the vector, and the neighbour lists of layer 0 (2m) and the upper layers (~m) at
    16 bytes per candidate, plus ~160 bytes of element header, with 20 % headroom. Capped at ``cap_mb``
    (RAG_HNSW_BUILD_MEMORY_MB): beyond it the build still completes, only more slowly.
    """
    per_element = dims * 4 + 8 + 3 * m * 16 + 160
    need = rows * per_element * 1.2 / 2**20 + 64
    return int(max(64, min(cap_mb, need)))


def create_vector_index(
    conn: psycopg.Connection,
    gen: int,
    m: int = 16,
    ef_construction: int = 64,
    memory_cap_mb: int = 2048,
    workers: int | None = None,
) -> int:
    """HNSW (cosine) on a generation's vectors; built once after the bulk load. Returns the memory used (MiB).

    ``m``/``ef_construction`` default to pgvector's; raise them (RAG_HNSW_M, RAG_HNSW_EF_CONSTRUCTION)
    when recall matters more than build time. They apply to generations built afterwards. The build's
    ``maintenance_work_mem`` is sized to the graph (:func:`hnsw_build_memory_mb`) for this statement's
    transaction only; call it inside a transaction. ``workers`` (RAG_HNSW_BUILD_WORKERS) sets
    ``max_parallel_maintenance_workers`` for it too (None: the server's setting, 2 by default).
    """
    rows, dims = conn.execute(
        sql.SQL(
            "SELECT (SELECT count(*) FROM {items}),"
            " (SELECT atttypmod FROM pg_attribute WHERE attrelid = {reg}::regclass AND attname = 'embedding')"
        ).format(items=items_table(gen), reg=sql.Literal(f"g{gen}_items"))
    ).fetchone()
    mem_mb = hnsw_build_memory_mb(int(rows), max(int(dims or 0), 1), int(m), memory_cap_mb)
    conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(sql.Literal(f"{mem_mb}MB")))
    if workers is not None:
        conn.execute(
            sql.SQL("SET LOCAL max_parallel_maintenance_workers = {}").format(sql.Literal(int(workers)))
        )
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {name} ON {items} USING hnsw (embedding vector_cosine_ops)"
            " WITH (m = {m}, ef_construction = {efc})"
        ).format(
            name=sql.Identifier(f"g{gen}_items_hnsw"),
            items=items_table(gen),
            m=sql.Literal(int(m)),
            efc=sql.Literal(int(ef_construction)),
        )
    )
    return mem_mb


def drop_generation_tables(conn: psycopg.Connection, gen: int) -> None:
    for t in (items_table(gen), pos_table(gen), docs_table(gen)):
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))


def serving_rows_sql(gen: int) -> sql.Composed:
    """The serving rows of a generation: chunk_id, doc_id, shard, seq, text, metadata, embedding."""
    return sql.SQL(
        """SELECT i.chunk_id, i.doc_id, i.shard, p.seq, i.text, d.metadata, i.embedding
           FROM {items} i JOIN {pos} p ON p.chunk_id = i.chunk_id JOIN {docs} d ON d.doc_id = i.doc_id"""
    ).format(items=items_table(gen), pos=pos_table(gen), docs=docs_table(gen))


def generation_text_search_config(conn: psycopg.Connection, gen: int) -> str | None:
    """The text search configuration of generation ``gen``'s stored full-text column, or None when
    the generation predates full-text search (its ``items`` table has no such column)."""
    row = conn.execute(
        """SELECT a.attnum, col_description(a.attrelid, a.attnum) FROM pg_attribute a
           WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped""",
        (items_table(gen).as_string(conn), TSV_COLUMN),
    ).fetchone()
    if row is None:
        return None
    return row[1] or DEFAULT_TEXT_SEARCH_CONFIG


def serving_view_sql(
    conn: psycopg.Connection, gen: int, legacy_text_search_config: str = DEFAULT_TEXT_SEARCH_CONFIG
) -> sql.Composed:
    """What readers select from ``items``: the serving rows, the generation, and full text.

    ``tsv`` is the generation's stored full-text column and ``ts_config`` its configuration (a
    constant, so ``websearch_to_tsquery(ts_config, ...)`` stays index-usable once the view is inlined).
    A generation built before full-text search has no stored column: the view computes ``tsv`` from
    the text with ``legacy_text_search_config`` instead. Keyword queries then give the same answers,
    without the GIN index (a scan of the generation); rebuilding the generation (``index --full``)
    makes them fast. Adding the column in place is not done: ALTER TABLE ... ADD COLUMN ... STORED
    rewrites the vector table and its HNSW index under an exclusive lock, blocking every reader.
    """
    cfg = generation_text_search_config(conn, gen)
    if cfg is None:
        logging.getLogger(__name__).warning(
            "generation %s predates full-text search: keyword and hybrid queries compute its tsvectors "
            "on the fly (no GIN index); rebuild it (rag-assets index --full) to store them",
            gen,
        )
        tsv = sql.SQL("to_tsvector({}::regconfig, i.text)").format(sql.Literal(legacy_text_search_config))
        cfg = legacy_text_search_config
    else:
        tsv = sql.SQL("i.{}").format(sql.Identifier(TSV_COLUMN))
    return sql.SQL(
        """SELECT i.chunk_id, i.doc_id, i.shard, p.seq, i.text, d.metadata, i.embedding,
                  {gen}::integer AS generation, {tsv} AS tsv, {cfg}::regconfig AS ts_config
           FROM {items} i JOIN {pos} p ON p.chunk_id = i.chunk_id JOIN {docs} d ON d.doc_id = i.doc_id"""
    ).format(
        gen=sql.Literal(gen),
        tsv=tsv,
        cfg=sql.Literal(cfg),
        items=items_table(gen),
        pos=pos_table(gen),
        docs=docs_table(gen),
    )


def point_view_at(
    conn: psycopg.Connection, gen: int, legacy_text_search_config: str = DEFAULT_TEXT_SEARCH_CONFIG
) -> None:
    """(Re)define ``items`` over generation ``gen``. Call inside the switching transaction."""
    conn.execute(
        sql.SQL("CREATE OR REPLACE VIEW items AS {}").format(
            serving_view_sql(conn, gen, legacy_text_search_config)
        )
    )
