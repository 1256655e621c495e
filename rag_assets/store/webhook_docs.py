"""Applying webhook inbox events to the manifest: the webhook source's manifest stage.

Events were committed durably by the HTTP receiver; here, per shard and in one transaction with
the manifest change, each document takes the state of its newest event (by the source's own
timestamp, later arrival breaking ties), deletes leave tombstones so an older update arriving
late cannot resurrect a document, and every consumed event is marked applied. Re-running after
a crash re-applies nothing twice: events are marked in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg

from rag_assets.manifest import ManifestEntry
from rag_assets.sources import DocumentError, make_webhook_document
from rag_assets.store.db import lock_shards
from rag_assets.store.manifest_store import DocUpdate, apply_manifest

SOURCE = "webhook"


def pending_inbox_shards(conn: psycopg.Connection) -> set[int]:
    return {r[0] for r in conn.execute("SELECT DISTINCT shard FROM rag.inbox WHERE applied_at IS NULL")}


def apply_inbox(conn: psycopg.Connection, shards: Iterable[int], *, limit: int = 100_000) -> dict:
    """Consume unapplied events of ``shards``; returns counts and per-event errors."""
    shards = sorted(set(shards))
    out = {"events_applied": 0, "events_stale": 0, "events_rejected": 0, "errors": []}
    with conn.transaction():
        lock_shards(conn, shards)
        events = conn.execute(
            """SELECT seq, event_id, event_type, doc_id, shard, source_time, content, metadata
               FROM rag.inbox WHERE applied_at IS NULL AND shard = ANY(%s) ORDER BY seq LIMIT %s""",
            (shards, limit),
        ).fetchall()
        if not events:
            return out
        newest: dict[str, tuple] = {}
        for ev in events:
            cur = newest.get(ev[3])
            if cur is None or (ev[5], ev[0]) >= (cur[5], cur[0]):
                newest[ev[3]] = ev
        doc_ids = sorted(newest)
        current = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT doc_id, source, source_time FROM rag.manifest WHERE doc_id = ANY(%s)", (doc_ids,)
            )
        }
        tombs = dict(
            conn.execute(
                "SELECT doc_id, source_time FROM rag.tombstones WHERE doc_id = ANY(%s)", (doc_ids,)
            ).fetchall()
        )
        updates: dict[str, DocUpdate] = {}
        deletes: list[str] = []
        outcome: dict[int, str] = {ev[0]: "superseded" for ev in events}
        for doc_id, ev in newest.items():
            seq, _eid, etype, _d, shard, when, content, metadata = ev
            src, cur_time = current.get(doc_id, (None, None))
            if src is not None and src != SOURCE:
                outcome[seq] = f"rejected: {doc_id} belongs to the {src} source"
                out["errors"].append({"doc_id": doc_id, "error": outcome[seq]})
                continue
            last = max((t for t in (cur_time, tombs.get(doc_id)) if t is not None), default=None)
            if last is not None and when < last:
                outcome[seq] = "stale"
                out["events_stale"] += 1
                continue
            if etype == "document.deleted":
                deletes.append(doc_id)
                conn.execute(
                    """INSERT INTO rag.tombstones (doc_id, source_time) VALUES (%s, %s)
                       ON CONFLICT (doc_id) DO UPDATE SET source_time = greatest(rag.tombstones.source_time,
                       EXCLUDED.source_time)""",
                    (doc_id, when),
                )
                outcome[seq] = "applied"
                continue
            try:
                doc = make_webhook_document(doc_id, content or "", metadata or {}, when)
            except DocumentError as e:
                outcome[seq] = f"rejected: {e.reason}"
                out["errors"].append({"doc_id": doc_id, "error": e.reason})
                continue
            entry = ManifestEntry(
                doc_id, shard, doc.content_hash, doc.meta_hash, doc.size, doc.mtime_ns, SOURCE
            )
            updates[doc_id] = DocUpdate(entry, doc.metadata, doc.text, when)
            conn.execute("DELETE FROM rag.tombstones WHERE doc_id = %s", (doc_id,))
            outcome[seq] = "applied"
        out["events_applied"] = sum(1 for v in outcome.values() if v == "applied")
        out["events_rejected"] = sum(1 for v in outcome.values() if v.startswith("rejected"))
        if updates or deletes:
            diff, _ = apply_manifest(
                conn, shards, updates, source=SOURCE, full_snapshot=False, deletes=deletes
            )
            out.update(diff.counts())
        with conn.cursor() as cur:
            cur.executemany(
                "UPDATE rag.inbox SET applied_at = now(), outcome = %s WHERE seq = %s",
                [(o, s) for s, o in outcome.items()],
            )
    return out
