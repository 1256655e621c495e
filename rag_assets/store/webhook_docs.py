"""Applying webhook inbox events to the manifest: the webhook source's manifest stage.

Events were committed durably by the HTTP receiver; here, per shard and in one transaction with
the manifest change, each document takes the state of its newest event (by the source's own
timestamp, later arrival breaking ties), deletes leave tombstones so an older update arriving
late cannot resurrect a document, and every consumed event is marked applied. Re-running after
a crash re-applies nothing twice: events are marked in the same transaction.

An event that cannot be applied (a source time nothing downstream can store, such as ``infinity``
or year 9999 in a row written before the receiver checked them or by hand; an id that is not a
canonical path) is marked ``rejected: ...``, reported in ``errors`` by doc id and event id, and
skipped: it never blocks the other events of its shard, nor other shards. A stored manifest or
tombstone time that cannot be used does not pin its document either: the next event wins.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

import psycopg

from rag_assets.manifest import ManifestEntry
from rag_assets.sources import DocumentError, make_webhook_document
from rag_assets.store.db import lock_shards
from rag_assets.store.inbox import SOURCE_TIME_MAX, USABLE_TIME_MIN, doc_id_problem
from rag_assets.store.manifest_store import DocUpdate, apply_manifest

SOURCE = "webhook"
_INT64_MAX = 2**63 - 1

# A source time column read only when every later stage can use it (else NULL): psycopg cannot even
# read 'infinity' or years after 9999, and mtime_ns overflows 64 bits after 2262.
_USABLE = "CASE WHEN {col} >= %(lo)s AND {col} < %(hi)s THEN {col} END"
_BOUNDS = {"lo": USABLE_TIME_MIN, "hi": SOURCE_TIME_MAX}


def _shown(s: str) -> str:
    """An id as it may appear in a report or on a terminal: control characters escaped."""
    if not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in s):
        return s
    return s.encode("unicode_escape").decode("ascii")


def pending_inbox_shards(conn: psycopg.Connection) -> set[int]:
    return {r[0] for r in conn.execute("SELECT DISTINCT shard FROM inbox WHERE applied_at IS NULL")}


def apply_inbox(
    conn: psycopg.Connection,
    shards: Iterable[int],
    *,
    limit: int = 100_000,
    max_metadata_bytes: int | None = None,
) -> dict:
    """Consume unapplied events of ``shards``; returns counts and per-event errors.

    ``max_metadata_bytes`` is the index's RAG_MAX_METADATA_BYTES (default: the documents' default).
    """
    bound = {} if max_metadata_bytes is None else {"max_metadata_bytes": max_metadata_bytes}
    shards = sorted(set(shards))
    out = {"events_applied": 0, "events_stale": 0, "events_rejected": 0, "errors": []}
    with conn.transaction():
        lock_shards(conn, shards)
        events = conn.execute(
            f"""SELECT seq, event_id, event_type, doc_id, shard, {_USABLE.format(col="source_time")},
                       content, metadata, source_time::text
               FROM inbox WHERE applied_at IS NULL AND shard = ANY(%(shards)s) ORDER BY seq LIMIT %(limit)s""",
            {**_BOUNDS, "shards": shards, "limit": limit},
        ).fetchall()
        if not events:
            return out
        outcome: dict[int, str] = {ev[0]: "superseded" for ev in events}

        def reject(ev: tuple, why: str) -> None:
            outcome[ev[0]] = f"rejected: {why}"
            out["errors"].append(
                {
                    "doc_id": _shown(ev[3]),
                    "event_id": _shown(ev[1]),
                    "error": f"event {_shown(ev[1])!r}: {why}",
                }
            )

        newest: dict[str, tuple] = {}
        for ev in events:
            if ev[5] is None:
                reject(
                    ev,
                    f"source time {ev[8]} cannot be used (it must lie between {USABLE_TIME_MIN.year} "
                    f"and {SOURCE_TIME_MAX.year}); the event is skipped",
                )
                continue
            problem = doc_id_problem(ev[3])
            if problem:
                reject(ev, f"doc_id {_shown(ev[3])!r} is not canonical: it {problem}")
                continue
            cur = newest.get(ev[3])
            if cur is None or (ev[5], ev[0]) >= (cur[5], cur[0]):
                newest[ev[3]] = ev
        doc_ids = sorted(newest)
        current = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                f"""SELECT doc_id, source, {_USABLE.format(col="source_time")}
                    FROM manifest WHERE doc_id = ANY(%(ids)s)""",
                {**_BOUNDS, "ids": doc_ids},
            )
        }
        tombs = dict(
            conn.execute(
                f"""SELECT doc_id, {_USABLE.format(col="source_time")}
                    FROM tombstones WHERE doc_id = ANY(%(ids)s)""",
                {**_BOUNDS, "ids": doc_ids},
            ).fetchall()
        )
        updates: dict[str, DocUpdate] = {}
        deletes: list[str] = []
        for doc_id, ev in newest.items():
            seq, _eid, etype, _d, shard, when, content, metadata, _raw = ev
            src, cur_time = current.get(doc_id, (None, None))
            if src is not None and src != SOURCE:
                reject(ev, f"{_shown(doc_id)} belongs to the {src} source")
                continue
            last = max((t for t in (cur_time, tombs.get(doc_id)) if t is not None), default=None)
            if last is not None and when < last:
                outcome[seq] = "stale"
                out["events_stale"] += 1
                continue
            if etype == "document.deleted":
                deletes.append(doc_id)
                conn.execute(
                    """INSERT INTO tombstones (doc_id, source_time) VALUES (%(doc)s, %(t)s)
                       ON CONFLICT (doc_id) DO UPDATE SET source_time = CASE
                           WHEN tombstones.source_time >= %(lo)s AND tombstones.source_time < %(hi)s
                           THEN greatest(tombstones.source_time, EXCLUDED.source_time)
                           ELSE EXCLUDED.source_time END""",
                    {**_BOUNDS, "doc": doc_id, "t": when},
                )
                outcome[seq] = "applied"
                continue
            try:
                doc = make_webhook_document(
                    doc_id, content or "", metadata or {}, when, **bound
                )
            except DocumentError as e:
                reject(ev, e.reason)
                continue
            except (OverflowError, ValueError, OSError) as e:  # defensive: nothing else may stop the batch
                reject(ev, f"cannot be applied: {type(e).__name__}: {e}")
                continue
            if not -_INT64_MAX <= doc.mtime_ns <= _INT64_MAX:  # pragma: no cover - the bounds above hold
                reject(ev, f"source time {ev[8]} does not fit a 64-bit mtime")
                continue
            entry = ManifestEntry(
                doc_id, shard, doc.content_hash, doc.meta_hash, doc.size, doc.mtime_ns, SOURCE
            )
            updates[doc_id] = DocUpdate(entry, doc.metadata, doc.text, when)
            conn.execute("DELETE FROM tombstones WHERE doc_id = %s", (doc_id,))
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
                "UPDATE inbox SET applied_at = now(), outcome = %s WHERE seq = %s",
                [(o, s) for s, o in outcome.items()],
            )
    return out
