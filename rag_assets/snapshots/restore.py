"""Restore: load a verified snapshot into a new generation and switch to it, in one transaction.

Restore first checks the record and the shard trees (:mod:`.verify`), before touching the database,
then, in ONE transaction, creates a new generation and streams the pieces into it: the store's
thread pool fetches and verifies each piece (size, SHA-256, then columns and counts once decoded)
batches ahead of the load, one thread turns the next batch into columns, and this thread COPYs the
current batch (binary, straight from Arrow: :mod:`rag_assets.store.bulk_load`) into the new
generation and the bookkeeping (manifest, bodies, chunk_docs, chunks, shard_state,
generation_shards), so the restored manifest is the base of the next incremental run. Every table
it loads is empty, so its indexes are dropped for the load and built once afterwards. Then it adds
the vectors to the embedding cache, builds the HNSW index, checks the index digest against the
record, switches live (the view swap) and retires old generations. A corrupt or missing piece,
found at any point of the stream, raises an error naming it and rolls the transaction back; a kill
at any point before the commit likewise leaves the old generation live and the bookkeeping
untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql
from psycopg.types.json import Jsonb

from rag_assets.manifest import ManifestEntry, shard_version
from rag_assets.snapshots.layout import RECORD_FORMAT, SnapshotError, check_snapshot_id, load_record
from rag_assets.snapshots.pieces import Piece, parse_piece, piece_schema
from rag_assets.snapshots.stores import SnapshotStore
from rag_assets.snapshots.verify import fetch_piece, plan_pieces
from rag_assets.store import schema
from rag_assets.store.bulk_load import copy_arrow, drop_indexes_for_load, rebuild_indexes
from rag_assets.store.chunk_stage import chunks_version
from rag_assets.store.db import lock_shards
from rag_assets.store.generations import (
    GEN_LOCK,
    get_generation,
    live_generation,
    retire_old_generations,
    switch_live,
    verify_generation,
)
from rag_assets.store.serving import combine_digests, shard_digests
from rag_assets.store.shard_count import stored_shard_count


@dataclass
class _Batch:
    """The rows of a few shards, column by column (Arrow arrays; vectors as one 2-D array), ready for COPY."""

    shards: list[int]
    docs: dict[str, object] = field(default_factory=dict)  # one entry per document row of the pieces
    chunks: dict[str, object] = field(default_factory=dict)  # one entry per chunk
    entries: dict[int, list[ManifestEntry]] = field(default_factory=dict)
    n_docs: int = 0
    n_chunks: int = 0
    n_chunk_docs: int = 0


_BATCH_CHUNKS = 20_000  # rows of one pipeline stage: large enough for few COPY statements, small in memory
_BATCH_DOCS = 10_000


def _batches(
    per_shard: list[list[Piece]], max_chunks: int | None = None, max_docs: int | None = None
) -> list[list[int]]:
    """Consecutive shards grouped so one batch holds at most ~``max_chunks`` chunks (bounded memory)."""
    max_chunks = _BATCH_CHUNKS if max_chunks is None else max_chunks
    max_docs = _BATCH_DOCS if max_docs is None else max_docs
    out: list[list[int]] = []
    cur: list[int] = []
    n_ch = n_docs = 0
    for shard, pieces in enumerate(per_shard):
        cur.append(shard)
        n_ch += sum(p.chunks for p in pieces)
        n_docs += sum(p.docs for p in pieces)
        if n_ch >= max_chunks or n_docs >= max_docs:
            out.append(cur)
            cur, n_ch, n_docs = [], 0, 0
    if cur:
        out.append(cur)
    return out


def _first(mask: pa.Array) -> int | None:
    """The index of the first true value of a boolean array, or None."""
    hits = np.flatnonzero(mask.fill_null(False).to_numpy(zero_copy_only=False))
    return int(hits[0]) if len(hits) else None


def _prepare_batch(fetched: list[tuple[Piece, bytes]], shards: list[int], dims: int) -> _Batch:
    """Decode and check a batch's verified pieces, and turn them into columns (one thread, ahead of
    the COPY). Decoding here rather than in the fetch threads: ~7,000 tiny Parquet files per 20k
    documents cost mostly Python-side overhead, and 8 threads contending for the GIL used 30 % more
    CPU for it (measured) than this one thread does.

    Column-wise with Arrow kernels; only documents (manifest entries) and chunks whose text is
    stored as a span of the body touch Python objects.
    """
    b = _Batch(shards, entries={s: [] for s in shards})
    tables = [parse_piece(data, p, dims) for p, data in fetched]
    if not tables:
        return b
    want = piece_schema(dims)
    try:
        if all(x.schema.equals(tables[0].schema) for x in tables):
            t = pa.concat_tables(tables).cast(want)  # one cast per batch, not one per piece
        else:
            t = pa.concat_tables([x.cast(want) for x in tables])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise SnapshotError(
            f"shards {shards[0]}-{shards[-1]}: columns do not have the expected types ({e})"
        ) from None
    d = {name: t.column(name).combine_chunks() for name in want.names if name != "chunks"}
    has_cd = pc.is_valid(d["cd_chunker_version"])
    for cd_name, m_name in (
        ("cd_content_hash", "content_hash"),
        ("cd_meta_hash", "meta_hash"),
        ("cd_metadata", "metadata"),
    ):  # null: the same as the manifest's value
        filled = pc.coalesce(d[cd_name], d[m_name])
        i = _first(pc.and_(has_cd, pc.is_null(filled)))
        if i is not None:
            raise SnapshotError(
                f"shard {d['shard'][i].as_py()}: document {d['doc_id'][i].as_py()!r} has no {cd_name[3:]}"
            )
        d[cd_name] = filled
    b.docs = d
    b.n_docs = t.num_rows
    b.n_chunk_docs = int(pc.sum(has_cd.cast(pa.int64())).as_py() or 0)
    has_m = pc.is_valid(d["source"])
    m = [
        pc.filter(d[k], has_m).to_pylist()
        for k in ("doc_id", "shard", "content_hash", "meta_hash", "size", "mtime_ns", "source")
    ]
    for e in zip(*m, strict=True):
        b.entries[e[1]].append(ManifestEntry(*e))
    chunks = t.column("chunks").combine_chunks()
    flat = pc.list_flatten(chunks)
    n = len(flat)
    b.n_chunks = n
    if not n:
        return b
    parents = pc.list_parent_indices(chunks)
    c = dict(zip([f.name for f in flat.type], flat.flatten(), strict=True))
    emb = c.pop("embedding")
    if emb.null_count:
        raise SnapshotError(f"shards {shards[0]}-{shards[-1]}: a chunk has no vector")
    c["embedding"] = emb.flatten().to_numpy(zero_copy_only=False).reshape(n, dims)
    text = c["text"]
    if text.null_count:  # stored as the body's span [char_start, char_end)
        missing = np.flatnonzero(pc.is_null(text).to_numpy(zero_copy_only=False))
        par = parents.to_numpy(zero_copy_only=False)[missing]
        cs = c["char_start"].to_numpy(zero_copy_only=False)[missing]
        ce = c["char_end"].to_numpy(zero_copy_only=False)[missing]
        body = d["body"].to_pylist()
        spans = []
        for j, a, z, k in zip(par.tolist(), cs.tolist(), ce.tolist(), missing.tolist(), strict=True):
            if body[j] is None:
                raise SnapshotError(
                    f"shard {d['shard'][j].as_py()}: chunk {d['doc_id'][j].as_py()}#{c['seq'][k].as_py()} "
                    "has no text and no body"
                )
            spans.append(body[j][a:z])
        mask = np.zeros(n, bool)
        mask[missing] = True
        c["text"] = pc.replace_with_mask(text, pa.array(mask), pa.array(spans, pa.string()))
    c["doc_id"] = pc.take(d["doc_id"], parents)
    c["shard"] = pc.take(d["shard"], parents)
    b.chunks = c
    return b


# What a restore can write into each table, by column name (the columns are read from the catalog,
# so the load follows the schema; a required column we cannot fill is a clear error).
_MANIFEST_COLS = {
    n: n
    for n in (
        "doc_id",
        "shard",
        "source",
        "content_hash",
        "meta_hash",
        "size",
        "mtime_ns",
        "metadata",
        "source_time",
    )
}
_BODY_COLS = {"doc_id": "doc_id", "body": "body"}
_CHUNK_DOC_COLS = {
    "doc_id": "doc_id",
    "shard": "shard",
    "content_hash": "cd_content_hash",
    "meta_hash": "cd_meta_hash",
    "metadata": "cd_metadata",
    "chunker_version": "cd_chunker_version",
}
_CHUNK_COLS = {
    n: n
    for n in (
        "doc_id",
        "seq",
        "shard",
        "chunk_id",
        "chunk_hash",
        "text",
        "char_start",
        "char_end",
        "n_tokens",
        "embedding",
    )
}


@dataclass
class _CopyPlan:
    table: sql.Composable
    source: str  # "docs" or "chunks"
    columns: list[str]  # table columns
    fields: list[str]  # batch fields, in the same order
    types: list[str]
    only_if: str | None = None  # a batch field that must be non-null for the row to exist


def _copy_plan(
    conn, table: sql.Identifier, source: str, mapping: dict[str, str], only_if: str | None
) -> _CopyPlan:
    rows = conn.execute(
        """SELECT a.attname, t.typname, a.attnotnull, a.atthasdef
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""",
        (table.as_string(conn),),
    ).fetchall()
    if not rows:
        raise SnapshotError(f"table {table.as_string(conn)} does not exist")
    cols, fields, types = [], [], []
    for name, typ, notnull, hasdef in rows:
        if name in mapping:
            cols.append(name)
            fields.append(mapping[name])
            types.append(typ)
        elif notnull and not hasdef:
            raise SnapshotError(
                f"cannot restore into {table.as_string(conn)}: its column {name!r} is not in snapshots "
                f"of format {RECORD_FORMAT}"
            )
    return _CopyPlan(table, source, cols, fields, types, only_if)


_BOOKKEEPING = (
    ("manifest", "docs", _MANIFEST_COLS, "source"),
    ("document_bodies", "docs", _BODY_COLS, "body"),
    ("chunk_docs", "docs", _CHUNK_DOC_COLS, "cd_chunker_version"),
    ("chunks", "chunks", _CHUNK_COLS, None),
)


def _copy_plans(conn, gen_id: int) -> list[_CopyPlan]:
    """How to COPY a batch into the bookkeeping tables, then into each table of the new generation."""
    plans = [
        _copy_plan(conn, sql.Identifier(t), src, cols, cond) for t, src, cols, cond in _BOOKKEEPING
    ]
    # The new generation's tables (whatever schema.create_generation_tables made): tables keyed by
    # chunk get chunk rows, the others one row per document (its chunk_docs state).
    names = [
        r[0]
        for r in conn.execute(
            """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname LIKE %s ORDER BY c.relname""",
            (f"g{gen_id}\\_%",),
        ).fetchall()
    ]
    for name in names:
        ident = sql.Identifier(name)
        has_chunk_id = conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'chunk_id' AND NOT attisdropped",
            (ident.as_string(conn),),
        ).fetchone()
        if has_chunk_id:
            plans.append(_copy_plan(conn, ident, "chunks", _CHUNK_COLS, None))
        else:
            plans.append(_copy_plan(conn, ident, "docs", _CHUNK_DOC_COLS, "cd_chunker_version"))
    return plans


def _copy_batch(cur: psycopg.Cursor, plans: list[_CopyPlan], b: _Batch) -> None:
    for plan in plans:
        data = b.docs if plan.source == "docs" else b.chunks
        if not data:
            continue
        columns = [data[f] for f in plan.fields]
        if plan.only_if:
            keep = pc.is_valid(data[plan.only_if])
            keep_np = keep.to_numpy(zero_copy_only=False)
            columns = [v[keep_np] if isinstance(v, np.ndarray) else pc.filter(v, keep) for v in columns]
        copy_arrow(cur, plan.table, plan.columns, columns, plan.types)


def restore_snapshot(
    conn: psycopg.Connection,
    store: SnapshotStore,
    snapshot_id: str,
    *,
    keep_generations: int = 3,
    progress: Callable[[str], None] | None = None,
    hnsw_m: int = 16,
    hnsw_ef_construction: int = 64,
    hnsw_memory_cap_mb: int = 2048,
    memory_budget_mb: int = 1024,
    text_search_config: str = schema.DEFAULT_TEXT_SEARCH_CONFIG,
) -> dict:
    """Restore ``snapshot_id`` into a new generation and switch to it (see the module docstring).

    The restored generation's HNSW index is built with the index's own parameters (``hnsw_*``,
    from RAG_HNSW_M / RAG_HNSW_EF_CONSTRUCTION / RAG_HNSW_BUILD_MEMORY_MB), like any other.
    Pieces are fetched and verified ahead of the load, holding at most ``memory_budget_mb``
    (RAG_SNAPSHOT_RESTORE_MEMORY_MB) of fetched bytes not yet loaded (at least the next batch's).
    The restored chunks' full-text column is computed by ``text_search_config``
    (RAG_TEXT_SEARCH_CONFIG) as they are loaded: snapshots hold text, not tsvectors.

    The record and the shard trees are verified before the database is touched; each piece is
    verified (size, SHA-256, columns, counts) before its rows are written, all in the one
    transaction that then indexes, checks the digest and switches. Any failure (a corrupt or
    missing object included) rolls that transaction back: the live index stays as it was.
    """
    t0 = time.perf_counter()
    snapshot_id = check_snapshot_id(snapshot_id)
    if not 1 <= keep_generations <= 100:
        raise SnapshotError(f"keep_generations={keep_generations}: must be between 1 and 100")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise SnapshotError("restore_snapshot needs a connection with no open transaction")
    rec = load_record(store, snapshot_id)
    n_shards = rec["shard_count"]
    stored = stored_shard_count(conn)
    if stored is not None and stored != n_shards:
        raise SnapshotError(
            f"snapshot {snapshot_id} has {n_shards} shards but this index uses {stored}; restore it into "
            "a database with the same shard count (or an empty one)"
        )
    if progress:
        progress("verify")
    with ThreadPoolExecutor(max_workers=store.config.concurrency, thread_name_prefix="snapshot-get") as pool:
        per_shard, tree_bytes = plan_pieces(store, rec, pool)
        t_verified = time.perf_counter()
        if progress:
            progress(f"verify {sum(len(ps) for ps in per_shard)} objects")
        hnsw = (hnsw_m, hnsw_ef_construction, hnsw_memory_cap_mb)
        fetcher = _Fetcher(store, pool, per_shard, memory_budget_mb)
        result = _restore_in_transaction(
            conn, rec, per_shard, fetcher, keep_generations, progress, hnsw, text_search_config
        )
    nbytes = tree_bytes + fetcher.bytes_read
    t_end = time.perf_counter()
    rows = result["docs"] + result["chunks"]
    result.update(
        id=snapshot_id,
        bytes_read=nbytes,
        seconds_verify=round(t_verified - t0, 3),
        seconds=round(t_end - t0, 3),
        rows_per_s=round(rows / (t_end - t0), 1),
        mb_per_s=round(nbytes / 1e6 / (t_end - t0), 2),
    )
    return result


_AHEAD = 4  # batches fetched ahead of the one being loaded, at most


class _Fetcher:
    """Fetches and verifies pieces on the store's thread pool (file reads, S3 GETs and SHA-256
    release the GIL), batches ahead of the load, holding at most ``memory_budget_mb`` of fetched
    bytes not yet loaded (always the next two batches)."""

    def __init__(self, store: SnapshotStore, pool: ThreadPoolExecutor, per_shard, memory_budget_mb: int):
        self.store, self.pool, self.per_shard = store, pool, per_shard
        self.budget = max(0, memory_budget_mb) * 1024 * 1024
        self.futures: dict[int, list[tuple[Piece, Future]]] = {}
        self.sizes: dict[int, int] = {}
        self.next = 0  # the next batch to start fetching
        self.in_flight = 0  # bytes of batches fetched or being fetched, not yet loaded
        self.bytes_read = 0
        self.groups: list[list[int]] = []

    def start(self, groups: list[list[int]]) -> None:
        self.groups = groups
        self.ahead(0)

    def ahead(self, current: int) -> None:
        """Start fetching batches after ``current`` while the budget allows (always the next two, at
        most ``_AHEAD``: more would hold memory and not load sooner)."""
        while self.next < len(self.groups) and (
            self.next <= current + 1
            or (self.next <= current + _AHEAD and self.in_flight + self._size(self.next) <= self.budget)
        ):
            g = self.next
            pieces = [p for s in self.groups[g] for p in self.per_shard[s]]
            self.futures[g] = [(p, self.pool.submit(fetch_piece, self.store, p)) for p in pieces]
            self.in_flight += self._size(g)
            self.next += 1

    def _size(self, g: int) -> int:
        if g not in self.sizes:
            self.sizes[g] = sum(p.size for s in self.groups[g] for p in self.per_shard[s])
        return self.sizes[g]

    def take(self, g: int) -> list[tuple[Piece, bytes]]:
        """Batch ``g``'s verified bytes (waits for them; raises the first failure, naming the object)."""
        out = [(p, f.result()) for p, f in self.futures.pop(g)]
        self.bytes_read += sum(len(b) for _, b in out)
        return out

    def released(self, g: int) -> None:
        """Batch ``g`` is decoded: its bytes no longer count against the budget; fetch further ahead."""
        self.in_flight -= self._size(g)
        self.ahead(g)

    def cancel(self) -> None:
        for fs in list(self.futures.values()):  # (the prep thread may pop one meanwhile)
            for _, f in fs:
                f.cancel()
        self.futures.clear()


def _restore_in_transaction(
    conn, rec, per_shard, fetcher, keep, progress, hnsw=(16, 64, 2048), text_search_config="english"
) -> dict:
    snapshot_id = rec["id"]
    dims = rec["embedder"]["dims"]
    n_shards = rec["shard_count"]
    chunker_version = rec["chunker_version"]
    emb = rec["embedder"]
    counts = {"docs": 0, "chunks": 0, "chunk_docs": 0}
    t_load = time.perf_counter()
    with conn.transaction():
        if conn.info.server_version >= 140000:
            # a killed client aborts the transaction promptly, even mid-statement
            conn.execute("SET LOCAL client_connection_check_interval = 1000")
        conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
        conn.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(GEN_LOCK))
        lock_shards(conn, range(n_shards))
        row = conn.execute("SELECT value FROM settings WHERE key = 'shards'").fetchone()
        if row is None:
            conn.execute("INSERT INTO settings (key, value) VALUES ('shards', %s)", (Jsonb(n_shards),))
        elif int(row[0]) != n_shards:
            raise SnapshotError(f"snapshot {snapshot_id} has {n_shards} shards but this index uses {row[0]}")
        conn.execute(
            """INSERT INTO rag_cache.embedders (fingerprint, provider, model, dims) VALUES (%s, %s, %s, %s)
               ON CONFLICT (fingerprint) DO NOTHING""",
            (emb["fingerprint"], emb["provider"], emb["model"], dims),
        )
        embedder_id, have_dims = conn.execute(
            "SELECT id, dims FROM rag_cache.embedders WHERE fingerprint = %s", (emb["fingerprint"],)
        ).fetchone()
        if have_dims != dims:
            raise SnapshotError(
                f"embedder {emb['fingerprint']} has {have_dims} dimensions here but {dims} in snapshot {snapshot_id}"
            )
        previous = live_generation(conn)
        gen_id = conn.execute(
            """INSERT INTO generations (embedder_id, chunker_version, dims, state, origin)
               VALUES (%s, %s, %s, 'building', %s) RETURNING id""",
            (embedder_id, chunker_version, dims, f"restore:{snapshot_id}"),
        ).fetchone()[0]
        schema.create_generation_tables(conn, gen_id, dims, text_search_config)
        # The restored state replaces the bookkeeping wholesale (locks: every shard, GEN_LOCK).
        conn.execute("TRUNCATE manifest, document_bodies, chunk_docs, chunks")
        conn.execute("DELETE FROM shard_state")
        if progress:
            progress("load")
        versions: dict[int, str] = {}
        plans = _copy_plans(conn, gen_id)
        # Every table loaded here is empty now (truncated, or just created): its indexes are built
        # once after the load instead of maintained row by row (the rollback restores them on failure).
        deferred = [d for plan in plans for d in drop_indexes_for_load(conn, plan.table)]
        groups = _batches(per_shard)
        t_wait = 0.0
        with (
            conn.cursor() as cur,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="restore-prep") as prep,
        ):
            # A pipeline: the store's pool fetches and verifies pieces batches ahead; one thread decodes
            # the next batch; this thread COPYs the current one. A failure anywhere raises here.
            fetcher.start(groups)

            def prepare(g: int) -> _Batch:
                return _prepare_batch(fetcher.take(g), groups[g], dims)

            try:
                ahead = prep.submit(prepare, 0) if groups else None
                for gi in range(len(groups)):
                    tw = time.perf_counter()
                    batch = ahead.result()
                    t_wait += time.perf_counter() - tw
                    fetcher.released(gi)
                    ahead = prep.submit(prepare, gi + 1) if gi + 1 < len(groups) else None
                    _copy_batch(cur, plans, batch)
                    counts["chunks"] += batch.n_chunks
                    counts["chunk_docs"] += batch.n_chunk_docs
                    for shard in batch.shards:
                        entries = batch.entries[shard]
                        if len(entries) != rec["shards"][shard]["docs"]:
                            raise SnapshotError(
                                f"shard {shard}: {len(entries)} documents loaded, the record says {rec['shards'][shard]['docs']}"
                            )
                        versions[shard] = shard_version(entries)
                        counts["docs"] += len(entries)
            finally:
                fetcher.cancel()  # on failure: no more fetches start (running ones finish, unused)
            t_indexes = time.perf_counter()
            try:
                rebuild_indexes(conn, deferred)
            except psycopg.errors.UniqueViolation as e:
                raise SnapshotError(
                    f"snapshot {snapshot_id}: duplicate keys in the restored rows ({e.diag.message_primary}); "
                    "nothing was changed"
                ) from None
            t_indexes = time.perf_counter() - t_indexes
            cur.executemany(
                "INSERT INTO shard_state (shard, manifest_version, chunks_version) VALUES (%s, %s, %s)",
                [(s, v, chunks_version(v, chunker_version)) for s, v in versions.items()],
            )
            cur.executemany(
                "INSERT INTO generation_shards (generation, shard, chunks_version) VALUES (%s, %s, %s)",
                [(gen_id, s, chunks_version(v, chunker_version)) for s, v in versions.items()],
            )
            # ON CONFLICT DO NOTHING also skips a chunk_hash repeated within the statement (equal
            # texts, equal vectors): no DISTINCT ON, so no sort of every vector.
            t_cache = time.perf_counter()
            cur.execute(
                sql.SQL(
                    """INSERT INTO rag_cache.embedding_cache (embedder_id, chunk_hash, embedding, n_tokens)
                       SELECT %s, i.chunk_hash, i.embedding, c.n_tokens
                       FROM {items} i JOIN chunks c ON c.chunk_id = i.chunk_id
                       ON CONFLICT (embedder_id, chunk_hash) DO NOTHING"""
                ).format(items=schema.items_table(gen_id)),
                (embedder_id,),
            )
            cache_added = cur.rowcount
            t_cache = time.perf_counter() - t_cache
        if progress:
            progress("index")
        t_index = time.perf_counter()
        schema.create_vector_index(conn, gen_id, *hnsw)
        for plan in plans[len(_BOOKKEEPING) :]:  # the generation's tables
            conn.execute(sql.SQL("ANALYZE {}").format(plan.table))
        t_check = time.perf_counter()
        got = shard_digests(conn, gen_id)
        want = {s["shard"]: s["digest"] for s in rec["shards"] if s.get("digest")}
        if got != want:
            bad = sorted(s for s in set(got) | set(want) if got.get(s) != want.get(s))
            raise SnapshotError(
                f"snapshot {snapshot_id}: restored rows do not match the record's digest in shard(s) "
                f"{bad[:20]}; nothing was changed"
            )
        if combine_digests(got) != rec["index_digest"]:  # = index_digest(conn, gen_id), without a 2nd pass
            raise SnapshotError(
                f"snapshot {snapshot_id}: index digest mismatch after load; nothing was changed"
            )
        gen = get_generation(conn, gen_id)
        verify_generation(conn, gen)
        if progress:
            progress("switch")
        t_switch = time.perf_counter()
        switch_live(conn, gen_id)  # readers wait from here to the commit: keep it short
    t_done = time.perf_counter()
    # Old generations are dropped after the commit: DROP TABLE of a large generation must not
    # lengthen the window in which readers wait for the view, and if we die here they are
    # simply dropped by the next switch.
    dropped = retire_old_generations(conn, keep)
    return {
        "generation": gen_id,
        "previous_generation": previous.id if previous else None,
        "docs": counts["docs"],
        "chunks": counts["chunks"],
        "chunk_docs": counts["chunk_docs"],
        "cache_vectors_added": cache_added,
        "index_digest": rec["index_digest"],
        "generations_dropped": dropped,
        "seconds_load": round(t_index - t_load, 3),
        "seconds_load_waiting": round(t_wait, 3),  # of which the COPY waited for fetch + decode
        "seconds_indexes": round(t_indexes, 3),  # of which building the btree/GIN indexes after the COPY
        "seconds_cache": round(t_cache, 3),  # of which adding the vectors to the embedding cache
        "seconds_index": round(t_check - t_index, 3),
        "seconds_check": round(t_switch - t_check, 3),
        "switch_ms": round((t_done - t_switch) * 1000, 2),
    }
