"""Hashing, sharding and manifest diffs: pure functions, testable without a database.

The manifest is the record of what the index was built from: one entry per document with the
SHA-256 of its normalised body and of its canonical metadata. Comparing a fresh scan with it
classifies every document as added / modified / metadata-only / deleted / unchanged and names the
stale shards, which is all the orchestration needs to refresh only what changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


def content_hash(text: str) -> str:
    """SHA-256 of the normalised document body."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(value: object) -> str:
    """JSON with sorted keys and no insignificant whitespace: equal metadata, equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def meta_hash(metadata: Mapping) -> str:
    """SHA-256 of the canonical JSON of the metadata."""
    return hashlib.sha256(canonical_json(metadata).encode("utf-8")).hexdigest()


def shard_of(doc_id: str, n_shards: int) -> int:
    """Stable shard of a document. Never change this function: every document would move."""
    digest = hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % n_shards


def shard_key(shard: int) -> str:
    """Dagster partition key of a shard ("00".."98")."""
    return f"{shard:02d}"


def shard_from_key(key: str) -> int:
    return int(key)


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    doc_id: str
    shard: int
    content_hash: str
    meta_hash: str
    size: int
    mtime_ns: int
    source: str = "folder"


def shard_version(entries: Iterable[ManifestEntry]) -> str:
    """Digest of one shard's manifest (ids, content and metadata hashes), order-independent.

    It is the data version Dagster sees for ``raw_documents``/``document_manifest`` and the version
    the chunk and embedding stages record, so a stage knows whether it is behind its upstream.
    """
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.doc_id.encode("utf-8", "surrogatepass")):
        h.update(e.doc_id.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
        h.update(e.content_hash.encode())
        h.update(e.meta_hash.encode())
    return h.hexdigest()[:32]


@dataclass
class ManifestDiff:
    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    metadata_only: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    stale_shards: set[int] = field(default_factory=set)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.modified or self.metadata_only or self.deleted)

    def counts(self) -> dict[str, int]:
        return {
            "docs_added": len(self.added),
            "docs_modified": len(self.modified),
            "docs_metadata_only": len(self.metadata_only),
            "docs_deleted": len(self.deleted),
            "docs_unchanged": len(self.unchanged),
        }


def diff_manifests(old: Mapping[str, ManifestEntry], new: Mapping[str, ManifestEntry]) -> ManifestDiff:
    """Classify every document of ``old`` ∪ ``new``; stale shards are those with any change."""
    d = ManifestDiff()
    for doc_id, n in new.items():
        o = old.get(doc_id)
        if o is None:
            d.added.append(doc_id)
            d.stale_shards.add(n.shard)
        elif o.content_hash != n.content_hash:
            d.modified.append(doc_id)
            d.stale_shards.add(n.shard)
        elif o.meta_hash != n.meta_hash:
            d.metadata_only.append(doc_id)
            d.stale_shards.add(n.shard)
        else:
            d.unchanged.append(doc_id)
    for doc_id, o in old.items():
        if doc_id not in new:
            d.deleted.append(doc_id)
            d.stale_shards.add(o.shard)
    for lst in (d.added, d.modified, d.metadata_only, d.deleted, d.unchanged):
        lst.sort()
    return d


def stat_candidates(
    stats: Mapping[str, tuple[int, int]] | Mapping,
    old: Mapping[str, ManifestEntry],
    n_shards: int,
) -> tuple[set[int], list[str]]:
    """The fast path: shards whose files changed by (size, mtime) or appeared/disappeared.

    Returns (shards to look at, doc_ids that must be re-read). Files whose stat matches the
    manifest are trusted unread, as git's index does; ``--rehash`` bypasses this.
    """
    shards: set[int] = set()
    reread: list[str] = []
    for doc_id, st in stats.items():
        o = old.get(doc_id)
        if o is None or o.size != st.size or o.mtime_ns != st.mtime_ns:
            reread.append(doc_id)
            shards.add(o.shard if o is not None else shard_of(doc_id, n_shards))
    for doc_id, o in old.items():
        if o.source == "folder" and doc_id not in stats:
            shards.add(o.shard)
    return shards, reread
