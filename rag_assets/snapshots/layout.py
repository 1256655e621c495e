"""What a snapshot store holds, and how its names and records are spelled.

Layout in a store (a folder, or ``s3://bucket/prefix``; see :mod:`rag_assets.snapshots.stores`)::

    objects/ab/ab12….parquet   one *piece*: the complete state of a few documents of one shard
    objects/cd/cd34….json      one *shard tree*: the list of a shard's pieces
    snapshots/<id>.json        the snapshot record (written last)
    pending/<id>.json          a marker while a create or prune runs (see :mod:`.markers`)

Every object is named by the SHA-256 of its bytes, and the bytes are a deterministic function of
the data (rows sorted, fixed Parquet writer options, no timestamps inside), so equal data gives
the same key and is stored once: a new snapshot uploads only the pieces that changed.

Every key is checked against this one grammar (:func:`check_key`) before any I/O, in every store:
a tampered record or a hostile id can never make a store read, write or delete outside its
root/prefix (no ``..``, no absolute paths, no other prefix).

The record (``RECORD_FORMAT``) names the embedder, chunker version, shard count, piece layout
and, per shard, its tree object, counts and digest; :func:`load_record` validates all of it
before anything trusts a field, so a damaged record is an error naming the snapshot.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from rag_assets.store.serving import combine_digests

if TYPE_CHECKING:  # stores import this module; a store is only an argument here
    from rag_assets.snapshots.stores import SnapshotStore


class SnapshotError(RuntimeError):
    """A snapshot operation failed; the message names the snapshot, object, shard or bucket at fault."""


RECORD_FORMAT = "rag-assets-snapshot/1"
TREE_FORMAT = "rag-assets-shard-tree/1"
PIECE_SPLIT = "sha256(doc_id)[8:16] binary trie"
DEFAULT_PIECE_MAX_DOCS = 4
DEFAULT_PIECE_MAX_BYTES = 8 * 1024 * 1024


SNAPSHOT_ID_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")
_SHA = r"[0-9a-f]{64}"
# The only keys a snapshot store ever holds. Objects are content-addressed (sha256 of their bytes).
KEY_RE = re.compile(
    r"(?:objects/(?P<dir>[0-9a-f]{2})/(?P<sha>" + _SHA + r")\.(?:parquet|json)"
    r"|(?:snapshots|pending)/(?P<id>[0-9A-Za-z][0-9A-Za-z._-]{0,127})\.json)"
)


def check_snapshot_id(snapshot_id: object) -> str:
    """A valid snapshot id, or :class:`SnapshotError` (no path separators, ``..``, NUL, or > 128 chars)."""
    if not isinstance(snapshot_id, str) or not SNAPSHOT_ID_RE.fullmatch(snapshot_id) or ".." in snapshot_id:
        shown = repr(snapshot_id)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise SnapshotError(
            f"invalid snapshot id {shown}: use 1-128 characters [0-9A-Za-z._-], starting with a letter or digit"
        )
    return snapshot_id


def check_key(key: object) -> str:
    """``key`` if it follows the snapshot layout, else :class:`SnapshotError` naming it."""
    if not isinstance(key, str):
        raise SnapshotError(f"invalid object key {key!r}: not a string")
    m = KEY_RE.fullmatch(key)
    if (
        m is None
        or (m.group("sha") and not m.group("sha").startswith(m.group("dir")))
        or (m.group("id") and ".." in m.group("id"))
    ):
        shown = repr(key)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        raise SnapshotError(f"invalid object key {shown}: outside the snapshot layout")
    return key


def object_key(sha256_hex: str, ext: str) -> str:
    """The key of a content-addressed object: ``objects/<2 hex>/<sha256>.<ext>``."""
    return f"objects/{sha256_hex[:2]}/{sha256_hex}.{ext}"


def key_sha256(key: str) -> str:
    """The sha256 an object key promises (objects are named by the hash of their bytes)."""
    m = KEY_RE.fullmatch(check_key(key))
    if not m or not m.group("sha"):
        raise SnapshotError(f"{key!r} is not a content-addressed object key")
    return m.group("sha")


def canonical(obj: object) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): equal content gives equal bytes, so equal keys."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def now_iso() -> str:
    """The current UTC time as an ISO string with microseconds (records and markers)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def new_snapshot_id(prefix: str = "") -> str:
    """``<UTC timestamp>-<8 hex>``: unique and sortable by creation time."""
    return f"{prefix}{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}-{secrets.token_hex(4)}"


def record_key(snapshot_id: str) -> str:
    """Where the record of ``snapshot_id`` lives (the id is checked first)."""
    return check_key(f"snapshots/{check_snapshot_id(snapshot_id)}.json")


def marker_key(marker_id: str) -> str:
    """Where the ``pending/`` marker of a running create or prune lives."""
    return check_key(f"pending/{check_snapshot_id(marker_id)}.json")


def _is_hex(s: object, n: int | None = None) -> bool:
    return isinstance(s, str) and (n is None or len(s) == n) and all(c in "0123456789abcdef" for c in s)


def is_count(v: object, lo: int = 0, hi: int = 1 << 62) -> bool:
    """Whether ``v`` is an int (not a bool) in ``[lo, hi]``: the check of every count in records and trees."""
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
    if not is_count(emb.get("dims"), 1, 16000):
        raise bad("embedder dims")
    if not isinstance(rec.get("chunker_version"), str) or not rec["chunker_version"]:
        raise bad("chunker_version")
    n = rec.get("shard_count")
    if not is_count(n, 1, 10_000):
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
            if not is_count(s.get(k)):
                raise bad(f"shard {i}: {k}")
        if s.get("digest") is not None and not _is_hex(s.get("digest"), 32):
            raise bad(f"shard {i}: digest")
    digests = {s["shard"]: s["digest"] for s in shards if s.get("digest")}
    if combine_digests(digests) != rec["index_digest"]:
        raise bad("the shard digests do not combine to index_digest")
    return rec


def load_record(store: SnapshotStore, snapshot_id: str) -> dict:
    """The validated record of ``snapshot_id``; :class:`SnapshotError` when missing, unreadable or invalid."""
    key = record_key(snapshot_id)
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


def record_ids(store: SnapshotStore) -> list[str]:
    """Every record's id, sorted (= by creation time); names that are not valid ids are skipped."""
    ids = []
    for key in store.list("snapshots/"):
        sid = key[len("snapshots/") : -len(".json")]
        try:
            ids.append(check_snapshot_id(sid))
        except SnapshotError:
            continue
    return sorted(ids)


def show_snapshot(store: SnapshotStore, snapshot_id: str) -> dict:
    """The validated record of one snapshot."""
    return load_record(store, check_snapshot_id(snapshot_id))


def list_snapshots(store: SnapshotStore) -> list[dict]:
    """One summary per snapshot record, oldest first (unreadable records carry an ``error``)."""
    out = []
    for sid in record_ids(store):
        try:
            rec = load_record(store, sid)
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
