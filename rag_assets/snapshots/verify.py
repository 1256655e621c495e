"""Verify: download every object of a snapshot and check it before a restore writes anything.

Restore must never leave a half-loaded index, so it first downloads and verifies every object
(size, SHA-256, Parquet footer, columns and row counts against the tree and the record). Verified
bytes stay in memory when the snapshot fits the restore memory budget
(``RAG_SNAPSHOT_RESTORE_MEMORY_MB``), else are spooled to local disk (or, for a folder store,
re-read and re-checked by :func:`verified_bytes` when they are loaded).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rag_assets.snapshots.layout import SnapshotError, key_sha256
from rag_assets.snapshots.pieces import Piece, get_verified, parse_piece, validate_tree
from rag_assets.snapshots.stores import FolderStore, SnapshotStore


def fetch_and_verify(
    store: SnapshotStore, rec: dict, spool: Path, progress, memory_budget_mb: int = 1024
) -> tuple[list[list[Piece]], int]:
    """Download every object and check size, SHA-256, Parquet footer and counts before any write.

    Verified piece bytes are kept in memory when the snapshot fits ``memory_budget_mb``
    (``RAG_SNAPSHOT_RESTORE_MEMORY_MB``, default 1024), else spooled to local disk (or, for a
    folder store, re-read and re-checked).
    """
    dims = rec["embedder"]["dims"]
    n = rec["shard_count"]
    per_shard: list[list[Piece]] = [[] for _ in range(n)]
    nbytes = 0
    with ThreadPoolExecutor(max_workers=store.config.concurrency, thread_name_prefix="snapshot-get") as pool:
        tree_data = list(
            pool.map(
                lambda s: get_verified(store, s["tree"], None, f"shard {s['shard']} tree"), rec["shards"]
            )
        )
        for s, data in zip(rec["shards"], tree_data, strict=True):
            nbytes += len(data)
            entries = validate_tree(data, s["tree"], s["shard"])
            where = f"shard {s['shard']} tree {s['tree']}"
            if len(entries) != s["pieces"]:
                raise SnapshotError(f"{where}: {len(entries)} pieces, the record says {s['pieces']}")
            if sum(e[3] for e in entries) != s["chunks"]:
                raise SnapshotError(
                    f"{where}: {sum(e[3] for e in entries)} chunks, the record says {s['chunks']}"
                )
            for key, size, docs, chunks in entries:
                per_shard[s["shard"]].append(Piece(s["shard"], key, size, docs, chunks))
        flat = [p for ps in per_shard for p in ps]
        in_memory = sum(p.size for p in flat) <= max(0, memory_budget_mb) * 1024 * 1024
        if progress:
            progress(f"verify {len(flat)} objects")

        def fetch(k_p: tuple[int, Piece]) -> int:
            k, p = k_p
            data = get_verified(store, p.key, p.size, f"shard {p.shard}")
            parse_piece(data, p, dims, footer_only=True)  # decoded in full (and counted) while loading
            if in_memory:
                p.data = data
            elif not isinstance(store, FolderStore):
                p.path = spool / f"{k}.parquet"
                p.path.write_bytes(data)
            return len(data)

        for got in pool.map(fetch, enumerate(flat)):
            nbytes += got
    return per_shard, nbytes


def verified_bytes(store: SnapshotStore, p: Piece) -> bytes:
    """A verified piece's bytes: from memory, or re-read from the spool or the folder and re-checked."""
    if p.data is not None:
        return p.data
    data = p.path.read_bytes() if p.path is not None else store.get(p.key)
    if len(data) != p.size or hashlib.sha256(data).hexdigest() != key_sha256(p.key):
        raise SnapshotError(f"shard {p.shard} object {p.key}: changed since it was verified")
    return data
