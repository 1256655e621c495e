"""Markers that keep a create and a prune of one store from racing each other.

Concurrency between create and prune: a create writes ``pending/<id>.json`` then looks for a
running prune (and gives up if it finds one); a prune writes its own marker then looks for
running creates (and, if it finds one, deletes records but defers deleting objects). With a
read-after-write consistent store (S3 and folders are) at least one of two racing operations
sees the other, so a prune never deletes an object a new snapshot is about to reuse. Markers
older than ``stale_after_s`` (a crashed process) are ignored and removed by prune.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime

from rag_assets.snapshots.layout import SnapshotError, canonical, marker_key, now_iso
from rag_assets.snapshots.stores import SnapshotStore

STALE_MARKER_S = 6 * 3600


def write_marker(store: SnapshotStore, marker_id: str, kind: str) -> str:
    """Announce a running ``kind`` operation (``create`` or ``prune``); returns the marker's key."""
    key = marker_key(marker_id)
    body = {
        "kind": kind,
        "id": marker_id,
        "started_at": now_iso(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    store.put_if_absent(key, canonical(body))
    return key


def active_markers(
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
