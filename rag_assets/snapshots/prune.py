"""Prune: keep the newest snapshots and delete only the objects no kept snapshot references.

Unchanged pieces are shared between snapshots, so an object can be deleted only when no kept
record's trees name it. Records go first, so an interruption never leaves a record pointing at
missing objects, and a running create (a fresh marker, :mod:`.markers`) defers object deletion.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from rag_assets.snapshots.layout import SnapshotError, load_record, new_snapshot_id, record_ids, record_key
from rag_assets.snapshots.markers import STALE_MARKER_S, active_markers, write_marker
from rag_assets.snapshots.pieces import get_verified, validate_tree
from rag_assets.snapshots.stores import FolderStore, SnapshotStore


def _referenced(store: SnapshotStore, ids: Iterable[str]) -> set[str]:
    refs: set[str] = set()
    trees_seen: set[str] = set()
    for sid in ids:
        rec = load_record(store, sid)
        for s in rec["shards"]:
            tkey = s["tree"]
            refs.add(tkey)
            if tkey in trees_seen:
                continue
            trees_seen.add(tkey)
            data = get_verified(store, tkey, None, f"snapshot {sid} shard {s['shard']} tree")
            for p in validate_tree(data, tkey, s["shard"]):
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
    marker = write_marker(store, marker_id, "prune")
    try:
        ids = record_ids(store)
        doomed = ids[: len(ids) - keep] if keep < len(ids) else []
        for sid in doomed:
            store.delete(record_key(sid))
        creating, stale = active_markers(store, "create", stale_after_s, exclude=marker)
        kept = record_ids(store)  # re-read: includes snapshots created since
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
