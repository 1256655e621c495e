"""Versioned, content-addressed snapshots of the index: create, verify, restore, prune.

A snapshot is an immutable set of content-addressed objects (Parquet *pieces* of a few documents
each, one JSON *tree* per shard) plus a small JSON record, in a folder or an S3 bucket; unchanged
pieces are shared between snapshots, so a snapshot of a 1% change writes a few % of the bytes.
Restore verifies everything, loads a new generation and switches to it atomically.

One idea per module:

- :mod:`.layout`   snapshot ids, object keys, the record format and reading records
- :mod:`.pieces`   the piece files and shard trees: the trie split, writing, reading, checksums
- :mod:`.markers`  the ``pending/`` markers that keep create and prune from racing
- :mod:`.create`   create a snapshot of the live generation
- :mod:`.verify`   download and check every object before a restore writes anything
- :mod:`.restore`  load a verified snapshot into a new generation and switch to it
- :mod:`.prune`    retention: delete records, then only objects no kept snapshot references
- :mod:`.stores`   the folder and S3 stores, and how they transfer (:class:`StoreConfig`)

Generation switches and rollback are :mod:`rag_assets.store.generations`; ``rollback``,
``list_generations`` and ``RollbackError`` are re-exported here for the callers that import them
from this package.
"""

from rag_assets.snapshots.create import create_snapshot
from rag_assets.snapshots.layout import (
    SnapshotError,
    check_key,
    check_snapshot_id,
    list_snapshots,
    new_snapshot_id,
    object_key,
    show_snapshot,
)
from rag_assets.snapshots.pieces import split_pieces
from rag_assets.snapshots.prune import prune_snapshots
from rag_assets.snapshots.restore import restore_snapshot
from rag_assets.snapshots.stores import (
    FolderStore,
    S3Store,
    SnapshotStore,
    StoreConfig,
    open_store,
    store_for_settings,
)
from rag_assets.store.generations import RollbackError, list_generations, rollback

__all__ = [
    "FolderStore",
    "RollbackError",
    "S3Store",
    "SnapshotError",
    "SnapshotStore",
    "StoreConfig",
    "check_key",
    "check_snapshot_id",
    "create_snapshot",
    "list_generations",
    "list_snapshots",
    "new_snapshot_id",
    "object_key",
    "open_store",
    "prune_snapshots",
    "restore_snapshot",
    "rollback",
    "show_snapshot",
    "split_pieces",
    "store_for_settings",
]
