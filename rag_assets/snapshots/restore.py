"""Restore: load a verified snapshot into a new generation and switch to it, in one transaction.

Restore first verifies every object (:mod:`.verify`), before touching the database, then, in ONE
transaction, creates a new generation, loads it by binary COPY, replaces the bookkeeping
(manifest, bodies, chunk_docs, chunks, shard_state, generation_shards) so the restored manifest
is the base of the next incremental run, adds the vectors to the embedding cache, builds the HNSW
index, checks the index digest against the record, switches live (the view swap) and retires old
generations. A kill at any point before the commit leaves the old generation live and the
bookkeeping untouched.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

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
from rag_assets.snapshots.verify import fetch_and_verify, verified_bytes
from rag_assets.store import schema
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


def _same(text: str) -> str:
    return text


def _IdentityJsonb(text: str) -> Jsonb:
    """A jsonb value that is already JSON text (dumped as-is, not re-encoded as a JSON string)."""
    return Jsonb(text, dumps=_same)


@dataclass
class _Batch:
    """The rows of a few shards, column by column, ready for COPY."""

    shards: list[int]
    docs: dict[str, list] = field(default_factory=dict)  # one entry per document row of the pieces
    chunks: dict[str, list] = field(default_factory=dict)  # one entry per chunk
    entries: dict[int, list[ManifestEntry]] = field(default_factory=dict)
    n_docs: int = 0
    n_chunks: int = 0


def _batches(
    per_shard: list[list[Piece]], max_chunks: int = 20_000, max_docs: int = 10_000
) -> list[list[int]]:
    """Consecutive shards grouped so one batch holds at most ~``max_chunks`` chunks (bounded memory)."""
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


def _prepare_batch(
    store: SnapshotStore, per_shard: list[list[Piece]], shards: list[int], dims: int
) -> _Batch:
    """Decode and check a batch's pieces and turn them into columns (runs ahead of the COPY)."""
    b = _Batch(shards, entries={s: [] for s in shards})
    tables = [parse_piece(verified_bytes(store, p), p, dims) for s in shards for p in per_shard[s]]
    if not tables:
        return b
    want = piece_schema(dims)
    try:
        t = pa.concat_tables([x.cast(want) for x in tables])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise SnapshotError(
            f"shards {shards[0]}-{shards[-1]}: columns do not have the expected types ({e})"
        ) from None
    d = {name: t.column(name).to_pylist() for name in want.names if name != "chunks"}
    d["metadata"] = [None if m is None else _IdentityJsonb(m) for m in d["metadata"]]
    d["cd_metadata"] = [None if m is None else _IdentityJsonb(m) for m in d["cd_metadata"]]
    for i, ver in enumerate(d["cd_chunker_version"]):
        if ver is None:
            continue
        for cd_name, m_name in (
            ("cd_content_hash", "content_hash"),
            ("cd_meta_hash", "meta_hash"),
            ("cd_metadata", "metadata"),
        ):
            if d[cd_name][i] is None:  # null: the same as the manifest's value
                if d[m_name][i] is None:
                    raise SnapshotError(
                        f"shard {d['shard'][i]}: document {d['doc_id'][i]!r} has no {cd_name[3:]}"
                    )
                d[cd_name][i] = d[m_name][i]
    b.docs = d
    b.n_docs = t.num_rows
    for i, src in enumerate(d["source"]):
        if src is not None:
            sh = d["shard"][i]
            b.entries[sh].append(
                ManifestEntry(
                    d["doc_id"][i],
                    sh,
                    d["content_hash"][i],
                    d["meta_hash"][i],
                    d["size"][i],
                    d["mtime_ns"][i],
                    src,
                )
            )
    chunks = t.column("chunks").combine_chunks()
    flat = pc.list_flatten(chunks)
    n = len(flat)
    b.n_chunks = n
    if not n:
        b.chunks = {}
        return b
    parents = pc.list_parent_indices(chunks).to_pylist()
    c = {
        name: flat.field(name).to_pylist()
        for name in ("seq", "chunk_id", "chunk_hash", "text", "char_start", "char_end", "n_tokens")
    }
    emb = flat.field("embedding")
    if emb.null_count:
        raise SnapshotError(f"shards {shards[0]}-{shards[-1]}: a chunk has no vector")
    vecs = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dims)
    body, doc_id, shard_col = d["body"], d["doc_id"], d["shard"]
    text, cs, ce = c["text"], c["char_start"], c["char_end"]
    for k in range(n):
        if text[k] is None:
            j = parents[k]
            if body[j] is None:
                raise SnapshotError(
                    f"shard {shard_col[j]}: chunk {doc_id[j]}#{c['seq'][k]} has no text and no body"
                )
            text[k] = body[j][cs[k] : ce[k]]
    c["doc_id"] = [doc_id[j] for j in parents]
    c["shard"] = [shard_col[j] for j in parents]
    c["embedding"] = list(vecs)
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

    def statement(self) -> sql.Composed:
        return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            self.table, sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)
        )


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
        keep = data[plan.only_if] if plan.only_if else None
        with cur.copy(plan.statement()) as cp:
            cp.set_types(plan.types)
            if keep is None:
                for row in zip(*columns, strict=True):
                    cp.write_row(row)
            else:
                for flag, row in zip(keep, zip(*columns, strict=True), strict=True):
                    if flag is not None:
                        cp.write_row(row)


def restore_snapshot(
    conn: psycopg.Connection,
    store: SnapshotStore,
    snapshot_id: str,
    *,
    keep_generations: int = 3,
    progress: Callable[[str], None] | None = None,
    spool_dir: str | Path | None = None,
    hnsw_m: int = 16,
    hnsw_ef_construction: int = 64,
    hnsw_memory_cap_mb: int = 2048,
    memory_budget_mb: int = 1024,
    text_search_config: str = schema.DEFAULT_TEXT_SEARCH_CONFIG,
) -> dict:
    """Restore ``snapshot_id`` into a new generation and switch to it (see the module docstring).

    The restored generation's HNSW index is built with the index's own parameters (``hnsw_*``,
    from RAG_HNSW_M / RAG_HNSW_EF_CONSTRUCTION / RAG_HNSW_BUILD_MEMORY_MB), like any other.
    Verified objects are held in memory up to ``memory_budget_mb`` (RAG_SNAPSHOT_RESTORE_MEMORY_MB),
    beyond it spooled under ``spool_dir``. The restored chunks' full-text column is computed by
    ``text_search_config`` (RAG_TEXT_SEARCH_CONFIG) as they are loaded: snapshots hold text, not tsvectors.

    Every object is verified before the database is touched; then one transaction loads,
    indexes, checks the digest and switches. Any failure leaves the live index as it was.
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
    with tempfile.TemporaryDirectory(prefix="rag-restore-", dir=spool_dir) as tmp:
        per_shard, nbytes = fetch_and_verify(store, rec, Path(tmp), progress, memory_budget_mb)
        t_verified = time.perf_counter()
        hnsw = (hnsw_m, hnsw_ef_construction, hnsw_memory_cap_mb)
        result = _restore_in_transaction(
            conn, store, rec, per_shard, keep_generations, progress, hnsw, text_search_config
        )
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


def _restore_in_transaction(
    conn, store, rec, per_shard, keep, progress, hnsw=(16, 64, 2048), text_search_config="english"
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
        groups = _batches(per_shard)
        with (
            conn.cursor() as cur,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="restore-prep") as prep,
        ):
            ahead = prep.submit(_prepare_batch, store, per_shard, groups[0], dims) if groups else None
            for gi in range(len(groups)):
                batch = ahead.result()
                ahead = (
                    prep.submit(_prepare_batch, store, per_shard, groups[gi + 1], dims)
                    if gi + 1 < len(groups)
                    else None
                )
                _copy_batch(cur, plans, batch)
                counts["chunks"] += batch.n_chunks
                counts["chunk_docs"] += sum(v is not None for v in batch.docs.get("cd_chunker_version", ()))
                for shard in batch.shards:
                    entries = batch.entries[shard]
                    if len(entries) != rec["shards"][shard]["docs"]:
                        raise SnapshotError(
                            f"shard {shard}: {len(entries)} documents loaded, the record says {rec['shards'][shard]['docs']}"
                        )
                    versions[shard] = shard_version(entries)
                    counts["docs"] += len(entries)
            cur.executemany(
                "INSERT INTO shard_state (shard, manifest_version, chunks_version) VALUES (%s, %s, %s)",
                [(s, v, chunks_version(v, chunker_version)) for s, v in versions.items()],
            )
            cur.executemany(
                "INSERT INTO generation_shards (generation, shard, chunks_version) VALUES (%s, %s, %s)",
                [(gen_id, s, chunks_version(v, chunker_version)) for s, v in versions.items()],
            )
            cur.execute(
                sql.SQL(
                    """INSERT INTO rag_cache.embedding_cache (embedder_id, chunk_hash, embedding, n_tokens)
                       SELECT DISTINCT ON (i.chunk_hash) %s, i.chunk_hash, i.embedding, c.n_tokens
                       FROM {items} i JOIN chunks c ON c.chunk_id = i.chunk_id
                       ORDER BY i.chunk_hash
                       ON CONFLICT (embedder_id, chunk_hash) DO NOTHING"""
                ).format(items=schema.items_table(gen_id)),
                (embedder_id,),
            )
            cache_added = cur.rowcount
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
        "seconds_index": round(t_check - t_index, 3),
        "seconds_check": round(t_switch - t_check, 3),
        "switch_ms": round((t_done - t_switch) * 1000, 2),
    }
