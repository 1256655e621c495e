"""Create: copy the live generation into a store as pieces, shard trees and a record.

Create reads everything in ONE repeatable-read, read-only transaction (a consistent cut even while
a refresh runs), refuses a live generation that lags its chunks, uploads pieces, then trees, then
the record; an interrupted create leaves no record (its objects are garbage for ``prune``).
Only objects the store lacks are uploaded (content addressing does the deduplication).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql

from rag_assets.snapshots.layout import (
    DEFAULT_PIECE_MAX_BYTES,
    DEFAULT_PIECE_MAX_DOCS,
    PIECE_SPLIT,
    RECORD_FORMAT,
    TREE_FORMAT,
    SnapshotError,
    canonical,
    new_snapshot_id,
    now_iso,
    object_key,
    record_ids,
    record_key,
)
from rag_assets.snapshots.markers import STALE_MARKER_S, active_markers, write_marker
from rag_assets.snapshots.pieces import PieceDoc, parquet_bytes, shard_table, split_pieces
from rag_assets.snapshots.stores import SnapshotStore
from rag_assets.store import schema
from rag_assets.store.generations import lagging_serving_shards, live_generation
from rag_assets.store.serving import combine_digests, shard_digests


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
) -> tuple[list[PieceDoc], np.ndarray]:
    docs: dict[str, PieceDoc] = {}
    with conn.cursor(binary=True) as cur:
        cur.execute(
            """SELECT m.doc_id, m.source, m.content_hash, m.meta_hash, m.size, m.mtime_ns, m.metadata::text,
                      m.source_time, b.body
               FROM manifest m LEFT JOIN document_bodies b ON b.doc_id = m.doc_id
               WHERE m.shard = %s""",
            (shard,),
        )
        for r in cur:
            docs[r[0]] = PieceDoc(r[0], shard, tuple(r[1:8]), r[8])
        cur.execute(
            """SELECT doc_id, content_hash, meta_hash, metadata::text, chunker_version
               FROM chunk_docs WHERE shard = %s""",
            (shard,),
        )
        for r in cur:
            d = docs.get(r[0]) or docs.setdefault(r[0], PieceDoc(r[0], shard))
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
        d = docs.get(r[0]) or docs.setdefault(r[0], PieceDoc(r[0], shard))
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


def _latest_layout(store: SnapshotStore) -> dict | None:
    ids = record_ids(store)
    for sid in reversed(ids):
        try:
            rec = json.loads(store.get(record_key(sid)))
            lay = rec.get("layout") or {}
            if lay.get("split") == PIECE_SPLIT:
                return lay
        except (SnapshotError, ValueError, AttributeError):
            continue
    return None


def _write_record(store: SnapshotStore, record: dict) -> int:
    """Write the record (last step of a create). Returns the bytes written."""
    data = canonical(record)
    if not store.put_if_absent(record_key(record["id"]), data):
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
        self.pool = ThreadPoolExecutor(
            max_workers=store.config.concurrency, thread_name_prefix="snapshot-put"
        )
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
        data = parquet_bytes(part)
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

    marker = write_marker(store, snapshot_id, "create")
    try:
        pruning, _ = active_markers(store, "prune", STALE_MARKER_S)
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
        tdata = canonical(tree)
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
        table = shard_table(ordered, vectors, dims) if ordered else None
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
        "created_at": now_iso(),
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
