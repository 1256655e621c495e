"""Verify: every object of a snapshot is checked as it is read, before its rows can be committed.

A restore first reads the record's shard trees (small JSON objects, checked against the record:
piece counts and chunk counts) to plan the load. Each piece is then fetched once, checked
(size and SHA-256 against its content-addressed key) by :func:`fetch_piece`, decoded and checked
again (columns, shard, row and chunk counts against the tree: ``pieces.parse_piece``), and loaded
from those same bytes: nothing is read twice. Fetching runs in parallel threads ahead of the load
(``RAG_SNAPSHOT_CONCURRENCY``; hashlib and boto3 release the GIL), so a restore costs about the
larger of fetch and load instead of their sum. Every failure raises :class:`SnapshotError` naming
the object, and the restore's single transaction then rolls back: nothing switches.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from rag_assets.snapshots.layout import SnapshotError
from rag_assets.snapshots.pieces import Piece, get_verified, validate_tree
from rag_assets.snapshots.stores import SnapshotStore


def plan_pieces(
    store: SnapshotStore, rec: dict, pool: ThreadPoolExecutor
) -> tuple[list[list[Piece]], int]:
    """Every piece of the snapshot, per shard, from its verified shard trees; and the trees' bytes.

    The trees are fetched in parallel on ``pool``, each checked by SHA-256 and against the record
    (piece and chunk counts), so a damaged or missing tree is an error before any row is read.
    """
    per_shard: list[list[Piece]] = [[] for _ in range(rec["shard_count"])]
    nbytes = 0
    tree_data = list(
        pool.map(lambda s: get_verified(store, s["tree"], None, f"shard {s['shard']} tree"), rec["shards"])
    )
    for s, data in zip(rec["shards"], tree_data, strict=True):
        nbytes += len(data)
        entries = validate_tree(data, s["tree"], s["shard"])
        where = f"shard {s['shard']} tree {s['tree']}"
        if len(entries) != s["pieces"]:
            raise SnapshotError(f"{where}: {len(entries)} pieces, the record says {s['pieces']}")
        if sum(e[3] for e in entries) != s["chunks"]:
            raise SnapshotError(f"{where}: {sum(e[3] for e in entries)} chunks, the record says {s['chunks']}")
        for key, size, docs, chunks in entries:
            per_shard[s["shard"]].append(Piece(s["shard"], key, size, docs, chunks))
    return per_shard, nbytes


def fetch_piece(store: SnapshotStore, p: Piece) -> bytes:
    """A piece's bytes, checked against the size its tree names and the SHA-256 its key promises."""
    return get_verified(store, p.key, p.size, f"shard {p.shard}")
