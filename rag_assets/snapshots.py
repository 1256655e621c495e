"""Versioned, content-addressed snapshots of the index; restore into a new generation; rollback.

Layout in a store (a folder, or ``s3://bucket/prefix``; see :mod:`rag_assets.snapshot_store`)::

    objects/ab/ab12….parquet   one *piece*: the complete state of a few documents of one shard
    objects/cd/cd34….json      one *shard tree*: the list of a shard's pieces
    snapshots/<id>.json        the snapshot record (written last)
    pending/<id>.json          a marker while a create or prune runs (see "Concurrency" below)

Every object is named by the SHA-256 of its bytes, and the bytes are a deterministic function of
the data (rows sorted, fixed Parquet writer options, no timestamps inside), so equal data gives
the same key and is stored once: a new snapshot uploads only the pieces that changed.

Pieces, not whole shards. A random 1% change of the documents touches most of the 64 shards, so
per-shard objects would rewrite most of the bytes. Each shard is therefore split into pieces by a
binary trie over ``sha256(doc_id)[8:16]`` (bits independent of the shard hash): a trie node is
split while it holds more than ``piece_max_docs`` documents (or more than ``piece_max_bytes``
estimated bytes). The split depends only on the documents in that node, so an edit, insert or
delete rewrites one piece (two when a node splits or merges), and a 1% change rewrites about
``1% × (mean docs per piece, size-biased)`` ≈ 3–4% of the bytes with the default of 4 (measured:
3.6–3.9%; one object per shard would rewrite ~28% for 2,000 documents in 64 shards). The cost is
more, smaller objects (~3 documents each), so more requests per full snapshot or restore.
The layout parameters are recorded, and a new snapshot reuses the previous snapshot's values.

A piece is one Parquet file with one row per document: its ``manifest`` row, its body
(``document_bodies``), its ``chunk_docs`` row, and a nested list of its chunks
(its ``chunks`` rows plus the serving vector). A chunk's text is stored only
when it is not exactly ``body[char_start:char_end]`` (the chunker's contract), which halves the
text bytes. Restore rebuilds every bookkeeping table and the serving tables from these rows.

Create reads everything in ONE repeatable-read, read-only transaction (a consistent cut even while
a refresh runs), refuses a live generation that lags its chunks, uploads pieces, then trees, then
the record; an interrupted create leaves no record (its objects are garbage for ``prune``).

Restore downloads and verifies every object (size, SHA-256, Parquet parse, row counts) before
touching the database, then, in ONE transaction, creates a new generation, loads it by binary
COPY, replaces the bookkeeping (manifest, bodies, chunk_docs, chunks, shard_state,
generation_shards) so the restored manifest is the base of the next incremental run, adds the
vectors to the embedding cache, builds the HNSW index, checks the index digest against the
record, switches live (the view swap) and retires old generations. A kill at any point before
the commit leaves the old generation live and the bookkeeping untouched.

Concurrency between create and prune: a create writes ``pending/<id>.json`` then looks for a
running prune (and gives up if it finds one); a prune writes its own marker then looks for
running creates (and, if it finds one, deletes records but defers deleting objects). With a
read-after-write consistent store (S3 and folders are) at least one of two racing operations
sees the other, so a prune never deletes an object a new snapshot is about to reuse. Markers
older than ``stale_after_s`` (a crashed process) are ignored and removed by prune.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import json
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql
from psycopg.types.json import Jsonb

from rag_assets.manifest import ManifestEntry, shard_version
from rag_assets.snapshot_store import (
    FolderStore,
    S3Store,
    SnapshotError,
    SnapshotStore,
    check_key,
    check_snapshot_id,
    key_sha256,
    object_key,
    open_store,
    transfer_concurrency,
)
from rag_assets.store import schema
from rag_assets.store.chunk_stage import chunks_version
from rag_assets.store.db import lock_shards
from rag_assets.store.serving import (
    GEN_LOCK,
    combine_digests,
    get_generation,
    lagging_serving_shards,
    live_generation,
    retire_old_generations,
    shard_digests,
    switch_live,
    verify_generation,
)
from rag_assets.store.shard_count import stored_shard_count

__all__ = [
    "FolderStore",
    "RollbackError",
    "S3Store",
    "SnapshotError",
    "SnapshotStore",
    "create_snapshot",
    "list_generations",
    "list_snapshots",
    "open_store",
    "prune_snapshots",
    "restore_snapshot",
    "rollback",
    "show_snapshot",
]

RECORD_FORMAT = "rag-assets-snapshot/1"
TREE_FORMAT = "rag-assets-shard-tree/1"
PIECE_SPLIT = "sha256(doc_id)[8:16] binary trie"
DEFAULT_PIECE_MAX_DOCS = 4
DEFAULT_PIECE_MAX_BYTES = 8 * 1024 * 1024
STALE_MARKER_S = 6 * 3600

# Fixed writer options: with the same pyarrow version, equal tables give byte-identical files
# (checked by the tests). ``created_by`` names the pyarrow version, so an upgrade re-uploads
# each piece once; that costs bytes, never correctness (restore checks hashes and the digest).
PARQUET_OPTIONS: dict = {
    "version": "2.6",
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,  # pieces hold a few rows: dictionary pages would only add bytes
    "write_statistics": False,
    "store_schema": False,  # the schema is ours and fixed; saves ~1 KB per object
    "data_page_version": "1.0",
    "write_page_index": False,
    "use_byte_stream_split": ["chunks.list.element.embedding.list.element"],
}


class RollbackError(SnapshotError):
    """There is no generation to roll back to (or the switch failed); nothing changed."""


@functools.lru_cache(maxsize=16)
def _piece_schema(dims: int) -> pa.Schema:
    chunk = pa.struct(
        [
            ("seq", pa.int32()),
            ("chunk_id", pa.string()),
            ("chunk_hash", pa.string()),
            ("text", pa.string()),  # null: equal to body[char_start:char_end]
            ("char_start", pa.int32()),
            ("char_end", pa.int32()),
            ("n_tokens", pa.int32()),
            ("embedding", pa.list_(pa.float32(), dims)),
        ]
    )
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("shard", pa.int16()),
            # manifest (source is null when the document has no manifest row)
            ("source", pa.string()),
            ("content_hash", pa.string()),
            ("meta_hash", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("metadata", pa.string()),  # jsonb text as PostgreSQL prints it
            ("source_time", pa.timestamp("us", tz="UTC")),
            # document_bodies (null: no row)
            ("body", pa.string()),
            # chunk_docs (cd_chunker_version is null when the document has no row; the other
            # cd_ columns are null when equal to the manifest's value, as they are once chunked)
            ("cd_content_hash", pa.string()),
            ("cd_meta_hash", pa.string()),
            ("cd_metadata", pa.string()),
            ("cd_chunker_version", pa.string()),
            ("chunks", pa.list_(chunk)),
        ]
    )


# --- small helpers ---------------------------------------------------------------------------


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def new_snapshot_id(prefix: str = "") -> str:
    """``<UTC timestamp>-<8 hex>``: unique and sortable by creation time."""
    return f"{prefix}{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}-{secrets.token_hex(4)}"


def _record_key(snapshot_id: str) -> str:
    return check_key(f"snapshots/{check_snapshot_id(snapshot_id)}.json")


def _marker_key(marker_id: str) -> str:
    return check_key(f"pending/{check_snapshot_id(marker_id)}.json")


def _piece_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()[8:16], "big")


def _id_key(doc_id: str) -> bytes:
    return doc_id.encode("utf-8", "surrogatepass")  # PostgreSQL's "C" collation order


def split_pieces(doc_ids: list[str], weights: list[int], max_docs: int, max_bytes: int) -> list[list[int]]:
    """Partition documents into pieces by a binary trie over their hash; content-defined and local.

    Returns lists of indexes into ``doc_ids`` (each sorted by doc id), in trie order. A node is a
    leaf when it holds at most ``max_docs`` documents whose weights sum to at most ``max_bytes``
    (or a single document), so whether a node splits depends only on the documents inside it.
    """
    n = len(doc_ids)
    if n == 0:
        return []
    hs = [_piece_hash(d) for d in doc_ids]
    order = sorted(range(n), key=lambda i: (hs[i], _id_key(doc_ids[i])))
    sh = [hs[i] for i in order]
    cum = [0]
    for i in order:
        cum.append(cum[-1] + weights[i])
    out: list[list[int]] = []
    stack = [(0, n, 0, 0)]  # (lo, hi, depth, base) ; popped in trie order
    while stack:
        lo, hi, depth, base = stack.pop()
        if lo == hi:
            continue
        count = hi - lo
        if depth >= 64 or (count <= max_docs and (count == 1 or cum[hi] - cum[lo] <= max_bytes)):
            out.append(sorted(order[lo:hi], key=lambda i: _id_key(doc_ids[i])))
            continue
        mid_value = base + (1 << (63 - depth))
        mid = bisect.bisect_left(sh, mid_value, lo, hi)
        stack.append((mid, hi, depth + 1, mid_value))
        stack.append((lo, mid, depth + 1, base))
    return out


# --- reading one shard of the live generation -----------------------------------------------


@dataclass
class _Doc:
    doc_id: str
    shard: int
    manifest: tuple | None = None  # (source, content_hash, meta_hash, size, mtime_ns, metadata, source_time)
    body: str | None = None
    chunk_doc: tuple | None = None  # (content_hash, meta_hash, metadata, chunker_version)
    chunks: list = field(default_factory=list)  # (seq, chunk_id, chunk_hash, text, start, end, n_tokens, row)
    weight: int = 0


def _decode_vectors(blobs: list[bytes], dims: int, where: str) -> np.ndarray:
    """``vector_send`` output (int16 dims, int16 0, float32 BE × dims) → float32 (n, dims)."""
    if not blobs:
        return np.zeros((0, dims), np.float32)
    width = 4 + 4 * dims
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    if raw.size != width * len(blobs):
        raise SnapshotError(f"{where}: vectors are not all of dimension {dims}")
    raw = raw.reshape(len(blobs), width)
    got = raw[:, 0].astype(np.int32) * 256 + raw[:, 1]
    if not np.all(got == dims):
        raise SnapshotError(f"{where}: vectors are not all of dimension {dims}")
    return np.ascontiguousarray(raw[:, 4:]).view(">f4").astype(np.float32)


def _read_shard(
    conn: psycopg.Connection, gen_id: int, shard: int, dims: int
) -> tuple[list[_Doc], np.ndarray]:
    docs: dict[str, _Doc] = {}
    with conn.cursor(binary=True) as cur:
        cur.execute(
            """SELECT m.doc_id, m.source, m.content_hash, m.meta_hash, m.size, m.mtime_ns, m.metadata::text,
                      m.source_time, b.body
               FROM manifest m LEFT JOIN document_bodies b ON b.doc_id = m.doc_id
               WHERE m.shard = %s""",
            (shard,),
        )
        for r in cur:
            docs[r[0]] = _Doc(r[0], shard, tuple(r[1:8]), r[8])
        cur.execute(
            """SELECT doc_id, content_hash, meta_hash, metadata::text, chunker_version
               FROM chunk_docs WHERE shard = %s""",
            (shard,),
        )
        for r in cur:
            d = docs.get(r[0]) or docs.setdefault(r[0], _Doc(r[0], shard))
            cd = list(r[1:5])
            if d.manifest is not None:  # equal to the manifest's (the usual case): stored as null
                for k, m in ((0, 1), (1, 2), (2, 5)):
                    if cd[k] == d.manifest[m]:
                        cd[k] = None
            d.chunk_doc = tuple(cd)
        cur.execute(
            sql.SQL(
                """SELECT c.doc_id, c.seq, c.chunk_id, c.chunk_hash, c.text, c.char_start, c.char_end,
                          c.n_tokens, vector_send(i.embedding)
                   FROM chunks c JOIN {items} i ON i.chunk_id = c.chunk_id AND i.doc_id = c.doc_id
                        AND i.chunk_hash = c.chunk_hash
                   WHERE c.shard = %s"""
            ).format(items=schema.items_table(gen_id)),
            (shard,),
        )
        rows = cur.fetchall()
        cur.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM chunks WHERE shard = %s), (SELECT count(*) FROM {items} WHERE shard = %s)"
            ).format(items=schema.items_table(gen_id)),
            (shard, shard),
        )
        n_chunks, n_items = cur.fetchone()
    if not (len(rows) == n_chunks == n_items):
        raise SnapshotError(
            f"shard {shard}: {n_items} serving rows in generation {gen_id} but {n_chunks} chunks "
            f"({len(rows)} match); refresh the index before snapshotting"
        )
    vectors = _decode_vectors([r[8] for r in rows], dims, f"shard {shard}")
    for k, r in enumerate(rows):
        d = docs.get(r[0]) or docs.setdefault(r[0], _Doc(r[0], shard))
        text = r[4]
        if d.body is not None and d.body[r[5] : r[6]] == text:
            text = None  # rebuilt from the body on restore
        d.chunks.append((r[1], r[2], r[3], text, r[5], r[6], r[7], k))
    for d in docs.values():
        d.chunks.sort()
        d.weight = (
            len(d.body or "")
            + sum(len(c[3] or "") + 120 + 4 * dims for c in d.chunks)
            + 200
            + len(d.manifest[5] if d.manifest else "")
        )
    return list(docs.values()), vectors


def _shard_table(docs: list[_Doc], vectors: np.ndarray, dims: int) -> pa.Table:
    """One Arrow table with ``docs`` in the given order (pieces are slices of it)."""
    sch = _piece_schema(dims)
    chunk_type = sch.field("chunks").type.value_type

    def mcol(i):
        return [d.manifest[i] if d.manifest else None for d in docs]

    def ccol(i):
        return [d.chunk_doc[i] if d.chunk_doc else None for d in docs]

    flat = [c for d in docs for c in d.chunks]
    offsets = np.zeros(len(docs) + 1, dtype=np.int32)
    np.cumsum([len(d.chunks) for d in docs], out=offsets[1:])
    rows_idx = np.fromiter((c[7] for c in flat), dtype=np.int64, count=len(flat))
    emb = vectors[rows_idx] if len(flat) else np.zeros((0, dims), np.float32)
    chunk_arr = pa.StructArray.from_arrays(
        [
            pa.array([c[0] for c in flat], pa.int32()),
            pa.array([c[1] for c in flat], pa.string()),
            pa.array([c[2] for c in flat], pa.string()),
            pa.array([c[3] for c in flat], pa.string()),
            pa.array([c[4] for c in flat], pa.int32()),
            pa.array([c[5] for c in flat], pa.int32()),
            pa.array([c[6] for c in flat], pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dims),
        ],
        fields=list(chunk_type),
    )
    cols = [
        pa.array([d.doc_id for d in docs], pa.string()),
        pa.array([d.shard for d in docs], pa.int16()),
        pa.array(mcol(0), pa.string()),
        pa.array(mcol(1), pa.string()),
        pa.array(mcol(2), pa.string()),
        pa.array(mcol(3), pa.int64()),
        pa.array(mcol(4), pa.int64()),
        pa.array(mcol(5), pa.string()),
        pa.array(mcol(6), pa.timestamp("us", tz="UTC")),
        pa.array([d.body for d in docs], pa.string()),
        pa.array(ccol(0), pa.string()),
        pa.array(ccol(1), pa.string()),
        pa.array(ccol(2), pa.string()),
        pa.array(ccol(3), pa.string()),
        pa.ListArray.from_arrays(pa.array(offsets), chunk_arr),
    ]
    return pa.Table.from_arrays(cols, schema=sch)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=max(1, table.num_rows), **PARQUET_OPTIONS)
    return buf.getvalue().to_pybytes()


# --- markers (create/prune mutual exclusion) -------------------------------------------------


def _write_marker(store: SnapshotStore, marker_id: str, kind: str) -> str:
    key = _marker_key(marker_id)
    body = {
        "kind": kind,
        "id": marker_id,
        "started_at": _now_iso(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    store.put_if_absent(key, _canonical(body))
    return key


def _active_markers(
    store: SnapshotStore, kind: str, stale_after_s: float, exclude: str = ""
) -> tuple[list, list]:
    """(fresh markers of ``kind``, stale marker keys of any kind)."""
    fresh, stale = [], []
    now = datetime.now(UTC)
    for key in sorted(store.list("pending/")):
        if key == exclude:
            continue
        try:
            m = json.loads(store.get(key))
            age = (now - datetime.fromisoformat(m["started_at"])).total_seconds()
            mkind = m.get("kind")
        except (SnapshotError, ValueError, KeyError, TypeError):
            continue  # vanished or unreadable: not a running operation we can identify
        if age > stale_after_s:
            stale.append(key)
        elif mkind == kind:
            fresh.append(m)
    return fresh, stale


# --- create ----------------------------------------------------------------------------------


def _latest_layout(store: SnapshotStore) -> dict | None:
    ids = _record_ids(store)
    for sid in reversed(ids):
        try:
            rec = json.loads(store.get(_record_key(sid)))
            lay = rec.get("layout") or {}
            if lay.get("split") == PIECE_SPLIT:
                return lay
        except (SnapshotError, ValueError, AttributeError):
            continue
    return None


def _record_ids(store: SnapshotStore) -> list[str]:
    ids = []
    for key in store.list("snapshots/"):
        sid = key[len("snapshots/") : -len(".json")]
        try:
            ids.append(check_snapshot_id(sid))
        except SnapshotError:
            continue
    return sorted(ids)


def _write_record(store: SnapshotStore, record: dict) -> int:
    """Write the record (last step of a create). Returns the bytes written."""
    data = _canonical(record)
    if not store.put_if_absent(_record_key(record["id"]), data):
        raise SnapshotError(f"snapshot {record['id']} already exists in {store.uri}")
    store.flush()
    return len(data)


class _Uploader:
    """Serialises pieces and uploads what the store lacks, on a thread pool (content-addressed dedupe)."""

    def __init__(self, store: SnapshotStore):
        self.store = store
        self.existing = store.list("objects/")
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.stats = {"bytes_written": 0, "objects_written": 0, "objects_reused": 0, "bytes_reused": 0}
        self.pool = ThreadPoolExecutor(max_workers=transfer_concurrency(), thread_name_prefix="snapshot-put")
        self.futures: list[Future] = []

    def __enter__(self) -> _Uploader:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _put(self, key: str, data: bytes) -> None:
        with self.lock:
            if key in self.seen:
                return
            self.seen.add(key)
            have = self.existing.get(key)
            if have == len(data):
                self.stats["objects_reused"] += 1
                self.stats["bytes_reused"] += len(data)
                return
            self.stats["objects_written"] += 1
            self.stats["bytes_written"] += len(data)
        if have is not None:  # same name, wrong size: a damaged copy; replace it
            self.store.delete(key)
        self.store.put_if_absent(key, data, known_absent=True)

    def _piece_job(self, part: pa.Table) -> tuple[str, int]:
        data = _parquet_bytes(part)
        key = object_key(hashlib.sha256(data).hexdigest(), "parquet")
        self._put(key, data)
        return key, len(data)

    def piece(self, part: pa.Table) -> Future:
        f = self.pool.submit(self._piece_job, part)
        self.futures.append(f)
        return f

    def put(self, key: str, data: bytes) -> None:
        self.futures.append(self.pool.submit(self._put, key, data))

    def wait_all(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []


def create_snapshot(
    conn: psycopg.Connection,
    store: SnapshotStore,
    *,
    note: str | None = None,
    piece_max_docs: int | None = None,
    piece_max_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Snapshot the live generation into ``store``; returns the record summary and the write stats.

    Only objects the store lacks are uploaded (``objects_written``/``bytes_written`` vs
    ``objects_reused``). ``piece_max_docs``/``piece_max_bytes`` default to the previous
    snapshot's layout (so pieces keep matching), else 4 documents / 8 MiB.
    """
    t_start = time.perf_counter()
    if note is not None and (not isinstance(note, str) or len(note) > 1000 or "\x00" in note):
        raise SnapshotError("note must be a string of at most 1000 characters without NUL")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise SnapshotError("create_snapshot needs a connection with no open transaction")
    snapshot_id = new_snapshot_id()
    prev = _latest_layout(store) if piece_max_docs is None or piece_max_bytes is None else None
    max_docs = int(piece_max_docs or (prev or {}).get("max_docs") or DEFAULT_PIECE_MAX_DOCS)
    max_bytes = int(piece_max_bytes or (prev or {}).get("max_bytes") or DEFAULT_PIECE_MAX_BYTES)
    if not (1 <= max_docs <= 10**9 and 1024 <= max_bytes <= 1 << 40):
        raise SnapshotError(f"invalid piece layout: max_docs={max_docs}, max_bytes={max_bytes}")

    marker = _write_marker(store, snapshot_id, "create")
    try:
        pruning, _ = _active_markers(store, "prune", STALE_MARKER_S)
        if pruning:
            raise SnapshotError(
                f"a prune of {store.uri} is running (started {pruning[0].get('started_at')}); snapshot again after it"
            )
        with _Uploader(store) as up:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                record = _snapshot_in_transaction(conn, snapshot_id, note, max_docs, max_bytes, up, progress)
            up.wait_all()
        store.flush()  # every object is durable before the record names it
        if progress:
            progress("record")
        stats = up.stats
        stats["bytes_written"] += _write_record(store, record)
    finally:
        with contextlib.suppress(SnapshotError):
            store.delete(marker)
    secs = time.perf_counter() - t_start
    t = record["totals"]
    out = {
        "id": snapshot_id,
        "created_at": record["created_at"],
        "note": note,
        "generation": record["source_generation"],
        "index_digest": record["index_digest"],
        "shards": record["shard_count"],
        "docs": t["docs"],
        "chunks": t["chunks"],
        "objects": t["objects"],
        "bytes": t["bytes"],
        **stats,
        "seconds": round(secs, 3),
        "rows_per_s": round((t["docs"] + t["chunks"]) / secs, 1) if secs > 0 else None,
        "mb_per_s": round(t["bytes"] / 1e6 / secs, 2) if secs > 0 else None,
        "uri": store.uri,
    }
    return out


def _snapshot_in_transaction(conn, snapshot_id, note, max_docs, max_bytes, up: _Uploader, progress) -> dict:
    live = live_generation(conn)
    if live is None:
        raise SnapshotError(
            "nothing to snapshot: the index has no live generation (run `rag-assets index` first)"
        )
    row = conn.execute("SELECT value FROM settings WHERE key = 'shards'").fetchone()
    if row is None:
        raise SnapshotError("settings has no shard count: the index was never built")
    n_shards = int(row[0])
    lag = lagging_serving_shards(conn, live)
    lag |= {
        r[0]
        for r in conn.execute(
            "SELECT shard FROM shard_state WHERE chunks_version <> manifest_version || '|' || %s",
            (live.chunker_version,),
        ).fetchall()
    }
    if lag:
        shown = ", ".join(str(s) for s in sorted(lag)[:20]) + (" …" if len(lag) > 20 else "")
        raise SnapshotError(
            f"live generation {live.id} is not complete: {len(lag)} shard(s) behind the manifest "
            f"({shown}); finish the refresh, then snapshot"
        )
    fp, provider, model, dims = conn.execute(
        "SELECT fingerprint, provider, model, dims FROM rag_cache.embedders WHERE id = %s", (live.embedder_id,)
    ).fetchone()
    if dims != live.dims:
        raise SnapshotError(f"generation {live.id} has {live.dims} dims but its embedder row says {dims}")
    mversions = dict(conn.execute("SELECT shard, manifest_version FROM shard_state").fetchall())
    digests = shard_digests(conn, live.id)
    shards_out = []
    totals = {"docs": 0, "chunks": 0, "chunk_docs": 0, "objects": 0, "bytes": 0}

    def finish(
        shard: int, futures: list[Future], counts: list[tuple[int, int]], n_docs: int, n_cd: int
    ) -> None:
        """Once a shard's pieces are stored: its tree object and its record entry."""
        entries = []
        for f, (pdocs, pchunks) in zip(futures, counts, strict=True):
            key, size = f.result()
            entries.append([key, size, pdocs, pchunks])
        tree = {
            "format": TREE_FORMAT,
            "shard": shard,
            "columns": ["key", "bytes", "docs", "chunks"],
            "pieces": entries,
        }
        tdata = _canonical(tree)
        tkey = object_key(hashlib.sha256(tdata).hexdigest(), "json")
        up.put(tkey, tdata)
        shard_bytes = sum(e[1] for e in entries) + len(tdata)
        n_chunks = sum(e[3] for e in entries)
        shards_out.append(
            {
                "shard": shard,
                "tree": tkey,
                "tree_bytes": len(tdata),
                "pieces": len(entries),
                "bytes": shard_bytes,
                "docs": n_docs,
                "chunk_docs": n_cd,
                "chunks": n_chunks,
                "digest": digests.get(shard),
                "manifest_version": mversions.get(shard),
            }
        )
        totals["docs"] += n_docs
        totals["chunks"] += n_chunks
        totals["chunk_docs"] += n_cd
        totals["objects"] += len(entries) + 1
        totals["bytes"] += shard_bytes

    pending = None
    for shard in range(n_shards):
        if progress:
            progress(f"shard {shard}")
        docs, vectors = _read_shard(conn, live.id, shard, dims)
        stray = [d.doc_id for d in docs if d.shard != shard]
        if stray:
            raise SnapshotError(f"shard {shard}: documents {stray[:3]} belong to another shard")
        pieces = split_pieces([d.doc_id for d in docs], [d.weight for d in docs], max_docs, max_bytes)
        ordered = [docs[i] for p in pieces for i in p]
        table = _shard_table(ordered, vectors, dims) if ordered else None
        futures, counts, pos = [], [], 0
        for p in pieces:
            futures.append(up.piece(table.slice(pos, len(p))))
            counts.append((len(p), sum(len(docs[i].chunks) for i in p)))
            pos += len(p)
        if pending is not None:  # the previous shard's pieces were serialised while we read this one
            finish(*pending)
        n_docs = sum(1 for d in docs if d.manifest is not None)
        n_cd = sum(1 for d in docs if d.chunk_doc is not None)
        pending = (shard, futures, counts, n_docs, n_cd)
    if pending is not None:
        finish(*pending)
    extra = set(digests) - set(range(n_shards))
    if extra:
        raise SnapshotError(f"serving rows in shards {sorted(extra)} outside 0..{n_shards - 1}")
    return {
        "format": RECORD_FORMAT,
        "id": snapshot_id,
        "created_at": _now_iso(),
        "note": note,
        "source_generation": live.id,
        "embedder": {"fingerprint": fp, "provider": provider, "model": model, "dims": dims},
        "chunker_version": live.chunker_version,
        "shard_count": n_shards,
        "layout": {
            "split": PIECE_SPLIT,
            "max_docs": max_docs,
            "max_bytes": max_bytes,
            "piece": "parquet: one row per document (manifest, body, chunk_docs, nested chunks with vectors)",
            "pyarrow": pa.__version__,
        },
        "index_digest": combine_digests(digests),
        "totals": totals,
        "shards": shards_out,
    }


# --- records: read and validate --------------------------------------------------------------


def _is_hex(s: object, n: int | None = None) -> bool:
    return isinstance(s, str) and (n is None or len(s) == n) and all(c in "0123456789abcdef" for c in s)


def _int(v: object, lo: int = 0, hi: int = 1 << 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _validate_record(rec: object, snapshot_id: str) -> dict:
    def bad(why: str) -> SnapshotError:
        return SnapshotError(f"snapshot {snapshot_id}: invalid record ({why})")

    if not isinstance(rec, dict):
        raise bad("not a JSON object")
    if rec.get("format") != RECORD_FORMAT:
        raise bad(f"unknown format {rec.get('format')!r}")
    if rec.get("id") != snapshot_id:
        raise bad(f"its id is {rec.get('id')!r}")
    emb = rec.get("embedder")
    if not isinstance(emb, dict) or not all(
        isinstance(emb.get(k), str) for k in ("fingerprint", "provider", "model")
    ):
        raise bad("embedder")
    if not _int(emb.get("dims"), 1, 16000):
        raise bad("embedder dims")
    if not isinstance(rec.get("chunker_version"), str) or not rec["chunker_version"]:
        raise bad("chunker_version")
    n = rec.get("shard_count")
    if not _int(n, 1, 10_000):
        raise bad("shard_count")
    if not _is_hex(rec.get("index_digest"), 64):
        raise bad("index_digest")
    shards = rec.get("shards")
    if not isinstance(shards, list) or len(shards) != n:
        raise bad("shards list does not match shard_count")
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or s.get("shard") != i:
            raise bad(f"shard entry {i}")
        try:
            tkey = check_key(s.get("tree"))
        except SnapshotError as e:
            raise SnapshotError(f"snapshot {snapshot_id}: shard {i}: {e}") from None
        if not tkey.endswith(".json"):
            raise bad(f"shard {i}: tree {tkey!r} is not a tree object")
        for k in ("docs", "chunks", "chunk_docs", "pieces"):
            if not _int(s.get(k)):
                raise bad(f"shard {i}: {k}")
        if s.get("digest") is not None and not _is_hex(s.get("digest"), 32):
            raise bad(f"shard {i}: digest")
    digests = {s["shard"]: s["digest"] for s in shards if s.get("digest")}
    if combine_digests(digests) != rec["index_digest"]:
        raise bad("the shard digests do not combine to index_digest")
    return rec


def _load_record(store: SnapshotStore, snapshot_id: str) -> dict:
    key = _record_key(snapshot_id)
    try:
        data = store.get(key)
    except SnapshotError:
        if not store.exists(key):
            raise SnapshotError(f"snapshot {snapshot_id} not found in {store.uri}") from None
        raise
    try:
        rec = json.loads(data)
    except ValueError as e:
        raise SnapshotError(f"snapshot {snapshot_id}: record is not valid JSON ({e})") from None
    return _validate_record(rec, snapshot_id)


def _validate_tree(data: bytes, key: str, shard: int) -> list[list]:
    where = f"shard {shard} tree {key}"
    try:
        tree = json.loads(data)
    except ValueError as e:
        raise SnapshotError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(tree, dict) or tree.get("format") != TREE_FORMAT or tree.get("shard") != shard:
        raise SnapshotError(f"{where}: not the tree of shard {shard}")
    pieces = tree.get("pieces")
    if not isinstance(pieces, list):
        raise SnapshotError(f"{where}: no piece list")
    for p in pieces:
        if not (isinstance(p, list) and len(p) == 4):
            raise SnapshotError(f"{where}: malformed piece entry")
        try:
            pkey = check_key(p[0])
        except SnapshotError as e:
            raise SnapshotError(f"{where}: {e}") from None
        if not pkey.endswith(".parquet") or not all(_int(v) for v in p[1:]):
            raise SnapshotError(f"{where}: malformed piece entry {pkey!r}")
    return pieces


def _get_verified(store: SnapshotStore, key: str, size: int | None, where: str) -> bytes:
    try:
        data = store.get(key)
    except SnapshotError as e:
        raise SnapshotError(f"{where}: object {key} is missing or unreadable ({e})") from None
    if size is not None and len(data) != size:
        raise SnapshotError(
            f"{where}: object {key} has {len(data)} bytes, expected {size} (truncated or damaged)"
        )
    if hashlib.sha256(data).hexdigest() != key_sha256(key):
        raise SnapshotError(f"{where}: object {key} fails its SHA-256 checksum (corrupted)")
    return data


def show_snapshot(store: SnapshotStore, snapshot_id: str) -> dict:
    """The validated record of one snapshot."""
    return _load_record(store, check_snapshot_id(snapshot_id))


def list_snapshots(store: SnapshotStore) -> list[dict]:
    """One summary per snapshot record, oldest first (unreadable records carry an ``error``)."""
    out = []
    for sid in _record_ids(store):
        try:
            rec = _load_record(store, sid)
        except SnapshotError as e:
            out.append({"id": sid, "error": str(e)})
            continue
        out.append(
            {
                "id": sid,
                "created_at": rec.get("created_at"),
                "note": rec.get("note"),
                "docs": rec["totals"]["docs"],
                "chunks": rec["totals"]["chunks"],
                "objects": rec["totals"]["objects"],
                "bytes": rec["totals"]["bytes"],
                "shards": rec["shard_count"],
                "embedder": rec["embedder"]["fingerprint"],
                "chunker_version": rec["chunker_version"],
                "index_digest": rec["index_digest"],
                "source_generation": rec.get("source_generation"),
            }
        )
    return out


# --- restore ---------------------------------------------------------------------------------


@dataclass
class _Piece:
    shard: int
    key: str
    size: int
    docs: int
    chunks: int
    data: bytes | None = None  # verified bytes, when the snapshot fits the memory budget
    path: Path | None = None  # else a verified copy on local disk (S3), or None: re-read the folder


def _check_piece(t: pa.Table, p: _Piece, dims: int) -> pa.Table:
    """Row counts, shard and columns of one decoded piece (types are checked per batch by a cast)."""
    where = f"shard {p.shard} object {p.key}"
    if t.schema.names != _piece_schema(dims).names:
        raise SnapshotError(f"{where}: unexpected columns {t.schema.names}")
    if t.num_rows != p.docs:
        raise SnapshotError(f"{where}: {t.num_rows} documents, the tree says {p.docs}")
    try:
        n_chunks = int(pc.sum(pc.list_value_length(t.column("chunks"))).as_py() or 0)
        shards = t.column("shard")
        lo, hi = pc.min(shards).as_py(), pc.max(shards).as_py()
    except (pa.ArrowException, TypeError) as e:
        raise SnapshotError(f"{where}: columns do not have the expected types ({e})") from None
    if n_chunks != p.chunks:
        raise SnapshotError(f"{where}: {n_chunks} chunks, the tree says {p.chunks}")
    if t.num_rows and (lo != p.shard or hi != p.shard):
        raise SnapshotError(f"{where}: holds rows of another shard")
    if t.column("doc_id").null_count:
        raise SnapshotError(f"{where}: null doc_id")
    return t


def _parse_piece(data: bytes, p: _Piece, dims: int, *, footer_only: bool = False) -> pa.Table | None:
    """Decode a piece (or, with ``footer_only``, check its Parquet footer, columns and row count)."""
    try:
        f = pq.ParquetFile(pa.BufferReader(data))
        if footer_only:
            names = f.schema_arrow.names
            if names != _piece_schema(dims).names:
                raise SnapshotError(f"shard {p.shard} object {p.key}: unexpected columns {names}")
            if f.metadata.num_rows != p.docs:
                raise SnapshotError(
                    f"shard {p.shard} object {p.key}: {f.metadata.num_rows} documents, the tree says {p.docs}"
                )
            return None
        t = f.read()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise SnapshotError(f"shard {p.shard} object {p.key}: not a readable Parquet file ({e})") from None
    return _check_piece(t, p, dims)


def _memory_budget() -> int:
    raw = os.environ.get("RAG_SNAPSHOT_RESTORE_MEMORY_MB") or "1024"
    try:
        return max(0, int(raw)) * 1024 * 1024
    except ValueError:
        raise SnapshotError(f"RAG_SNAPSHOT_RESTORE_MEMORY_MB={raw!r} is not an integer") from None


def _fetch_and_verify(
    store: SnapshotStore, rec: dict, spool: Path, progress
) -> tuple[list[list[_Piece]], int]:
    """Download every object and check size, SHA-256, Parquet footer and counts before any write.

    Verified piece bytes are kept in memory when the snapshot fits ``RAG_SNAPSHOT_RESTORE_MEMORY_MB``
    (default 1024), else spooled to local disk (or, for a folder store, re-read and re-checked).
    """
    dims = rec["embedder"]["dims"]
    n = rec["shard_count"]
    per_shard: list[list[_Piece]] = [[] for _ in range(n)]
    nbytes = 0
    with ThreadPoolExecutor(max_workers=transfer_concurrency(), thread_name_prefix="snapshot-get") as pool:
        tree_data = list(
            pool.map(
                lambda s: _get_verified(store, s["tree"], None, f"shard {s['shard']} tree"), rec["shards"]
            )
        )
        for s, data in zip(rec["shards"], tree_data, strict=True):
            nbytes += len(data)
            entries = _validate_tree(data, s["tree"], s["shard"])
            where = f"shard {s['shard']} tree {s['tree']}"
            if len(entries) != s["pieces"]:
                raise SnapshotError(f"{where}: {len(entries)} pieces, the record says {s['pieces']}")
            if sum(e[3] for e in entries) != s["chunks"]:
                raise SnapshotError(
                    f"{where}: {sum(e[3] for e in entries)} chunks, the record says {s['chunks']}"
                )
            for key, size, docs, chunks in entries:
                per_shard[s["shard"]].append(_Piece(s["shard"], key, size, docs, chunks))
        flat = [p for ps in per_shard for p in ps]
        in_memory = sum(p.size for p in flat) <= _memory_budget()
        if progress:
            progress(f"verify {len(flat)} objects")

        def fetch(k_p: tuple[int, _Piece]) -> int:
            k, p = k_p
            data = _get_verified(store, p.key, p.size, f"shard {p.shard}")
            _parse_piece(data, p, dims, footer_only=True)  # decoded in full (and counted) while loading
            if in_memory:
                p.data = data
            elif not isinstance(store, FolderStore):
                p.path = spool / f"{k}.parquet"
                p.path.write_bytes(data)
            return len(data)

        for got in pool.map(fetch, enumerate(flat)):
            nbytes += got
    return per_shard, nbytes


def _piece_data(store: SnapshotStore, p: _Piece) -> bytes:
    if p.data is not None:
        return p.data
    data = p.path.read_bytes() if p.path is not None else store.get(p.key)
    if len(data) != p.size or hashlib.sha256(data).hexdigest() != key_sha256(p.key):
        raise SnapshotError(f"shard {p.shard} object {p.key}: changed since it was verified")
    return data


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
    per_shard: list[list[_Piece]], max_chunks: int = 20_000, max_docs: int = 10_000
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
    store: SnapshotStore, per_shard: list[list[_Piece]], shards: list[int], dims: int
) -> _Batch:
    """Decode and check a batch's pieces and turn them into columns (runs ahead of the COPY)."""
    b = _Batch(shards, entries={s: [] for s in shards})
    tables = [_parse_piece(_piece_data(store, p), p, dims) for s in shards for p in per_shard[s]]
    if not tables:
        return b
    want = _piece_schema(dims)
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
) -> dict:
    """Restore ``snapshot_id`` into a new generation and switch to it (see the module docstring).

    The restored generation's HNSW index is built with the index's own parameters (``hnsw_*``,
    from RAG_HNSW_M / RAG_HNSW_EF_CONSTRUCTION / RAG_HNSW_BUILD_MEMORY_MB), like any other.

    Every object is verified before the database is touched; then one transaction loads,
    indexes, checks the digest and switches. Any failure leaves the live index as it was.
    """
    t0 = time.perf_counter()
    snapshot_id = check_snapshot_id(snapshot_id)
    if not 1 <= keep_generations <= 100:
        raise SnapshotError(f"keep_generations={keep_generations}: must be between 1 and 100")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise SnapshotError("restore_snapshot needs a connection with no open transaction")
    rec = _load_record(store, snapshot_id)
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
        per_shard, nbytes = _fetch_and_verify(store, rec, Path(tmp), progress)
        t_verified = time.perf_counter()
        hnsw = (hnsw_m, hnsw_ef_construction, hnsw_memory_cap_mb)
        result = _restore_in_transaction(conn, store, rec, per_shard, keep_generations, progress, hnsw)
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


def _restore_in_transaction(conn, store, rec, per_shard, keep, progress, hnsw=(16, 64, 2048)) -> dict:
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
        schema.create_generation_tables(conn, gen_id, dims)
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


# --- prune -----------------------------------------------------------------------------------


def _referenced(store: SnapshotStore, ids: Iterable[str]) -> set[str]:
    refs: set[str] = set()
    trees_seen: set[str] = set()
    for sid in ids:
        rec = _load_record(store, sid)
        for s in rec["shards"]:
            tkey = s["tree"]
            refs.add(tkey)
            if tkey in trees_seen:
                continue
            trees_seen.add(tkey)
            data = _get_verified(store, tkey, None, f"snapshot {sid} shard {s['shard']} tree")
            for p in _validate_tree(data, tkey, s["shard"]):
                refs.add(p[0])
    return refs


def prune_snapshots(store: SnapshotStore, keep: int, *, stale_after_s: float = STALE_MARKER_S) -> dict:
    """Keep the ``keep`` newest snapshots; delete the others' records, then unreferenced objects.

    Records go first, so an interruption never leaves a record pointing at missing objects.
    Objects still referenced by a kept snapshot (or a snapshot created meanwhile) survive. While a
    create is running (a fresh ``pending/`` marker), object deletion is deferred to the next prune.
    """
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise SnapshotError(f"keep={keep!r}: must be a non-negative integer")
    marker_id = new_snapshot_id("prune-")
    marker = _write_marker(store, marker_id, "prune")
    try:
        ids = _record_ids(store)
        doomed = ids[: len(ids) - keep] if keep < len(ids) else []
        for sid in doomed:
            store.delete(_record_key(sid))
        creating, stale = _active_markers(store, "create", stale_after_s, exclude=marker)
        kept = _record_ids(store)  # re-read: includes snapshots created since
        out = {
            "kept": kept,
            "deleted_snapshots": doomed,
            "objects_deleted": 0,
            "bytes_freed": 0,
            "objects_kept": 0,
            "deferred": bool(creating),
        }
        if creating:
            out["reason"] = (
                f"{len(creating)} snapshot(s) being created; objects are deleted by the next prune"
            )
            return out
        try:
            refs = _referenced(store, kept)
        except SnapshotError as e:
            raise SnapshotError(
                f"cannot tell which objects are still needed ({e}); deleted {len(doomed)} record(s), kept all objects"
            ) from None
        objects = store.list("objects/")
        garbage = sorted(k for k in objects if k not in refs)
        store.delete_many(garbage)
        for key in stale:
            store.delete(key)
        if isinstance(store, FolderStore):
            for p in store.stale_temp_files(stale_after_s):
                p.unlink(missing_ok=True)
        out.update(
            objects_deleted=len(garbage),
            bytes_freed=sum(objects[k] for k in garbage),
            objects_kept=len(objects) - len(garbage),
            stale_markers_removed=len(stale),
        )
        return out
    finally:
        with contextlib.suppress(SnapshotError):
            store.delete(marker)


# --- generations and rollback ----------------------------------------------------------------


def _has_tables(conn: psycopg.Connection, gen_id: int) -> bool:
    """Whether the tables of a generation still exist (whatever tables the schema module defines)."""
    makers = [getattr(schema, n) for n in ("items_table", "pos_table", "docs_table") if hasattr(schema, n)]
    names = [m(gen_id).as_string(conn) for m in makers]
    row = conn.execute(
        "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest(%s::text[]) n", (names,)
    ).fetchone()
    return bool(row[0])


def list_generations(conn: psycopg.Connection) -> list[dict]:
    """Every generation with its state, embedder, whether its tables exist, and an approximate size."""
    rows = conn.execute(
        """SELECT g.id, g.state, g.origin, e.fingerprint, g.dims, g.chunker_version, g.created_at,
                  g.live_since, g.retired_at,
                  (SELECT c.reltuples::bigint FROM pg_class c WHERE c.oid = to_regclass(format('g%s_items', g.id))),
                  g.id = (SELECT generation FROM live)
           FROM generations g JOIN rag_cache.embedders e ON e.id = g.embedder_id
           ORDER BY g.id"""
    ).fetchall()
    target = _rollback_target(conn)
    return [
        {
            "id": r[0],
            "state": r[1],
            "origin": r[2],
            "embedder": r[3],
            "dims": r[4],
            "chunker_version": r[5],
            "created_at": r[6].isoformat() if r[6] else None,
            "live_since": r[7].isoformat() if r[7] else None,
            "retired_at": r[8].isoformat() if r[8] else None,
            "tables": _has_tables(conn, r[0]),
            "rows_estimate": int(r[9]) if r[9] is not None and r[9] >= 0 else None,
            "live": bool(r[10]),
            "rollback_target": r[0] == target,
        }
        for r in rows
    ]


def _rollback_target(conn: psycopg.Connection) -> int | None:
    """The most recently retired generation whose tables still exist."""
    rows = conn.execute(
        """SELECT g.id FROM generations g
           WHERE g.state = 'retired' AND g.id IS DISTINCT FROM (SELECT generation FROM live)
           ORDER BY g.retired_at DESC NULLS LAST, g.id DESC"""
    ).fetchall()
    for (gid,) in rows:
        if _has_tables(conn, gid):
            return gid
    return None


def rollback(conn: psycopg.Connection, keep_generations: int = 3) -> dict:
    """Switch live back to the most recently retired generation whose tables still exist.

    Nothing is re-embedded: the old tables (rows, vectors and HNSW index) are still there, and the
    switch is the same one-transaction view swap as a normal switch, so readers see the old or
    the new index, never a mix. Calling it again switches forward again. The bookkeeping is not
    rewound: the next refresh (with the settings that built the now-live generation) brings the
    generation up to the current sources, re-using the embedding cache.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RollbackError("rollback needs a connection with no open transaction")
    t0 = time.perf_counter()
    with conn.transaction():
        conn.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(GEN_LOCK))
        live = live_generation(conn)
        if live is None:
            raise RollbackError("nothing to roll back: the index has no live generation")
        target = _rollback_target(conn)
        if target is None:
            raise RollbackError(
                f"no previous generation to roll back to: generation {live.id} is live and no retired "
                "generation still has its tables (raise RAG_KEEP_GENERATIONS to keep more, or restore a snapshot)"
            )
        t_switch = time.perf_counter()
        switch_live(conn, target)
    switch_s = time.perf_counter() - t_switch
    total_s = time.perf_counter() - t0
    dropped = retire_old_generations(conn, max(2, keep_generations))
    gen = get_generation(conn, target)
    fp = conn.execute("SELECT fingerprint FROM rag_cache.embedders WHERE id = %s", (gen.embedder_id,)).fetchone()[0]
    return {
        "from_generation": live.id,
        "to_generation": target,
        "embedder": fp,
        "chunker_version": gen.chunker_version,
        "switch_ms": round(switch_s * 1000, 3),
        "total_ms": round(total_s * 1000, 3),
        "generations_dropped": dropped,
    }


def store_for_settings(settings) -> SnapshotStore:
    """The store ``Settings.snapshot_target`` names (``RAG_SNAPSHOT_URI``, else ``RAG_HOME/snapshots``)."""
    return open_store(settings.snapshot_target)
