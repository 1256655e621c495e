"""Pure tests of hashing, sharding and diffs (no database)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rag_assets.manifest import (
    ManifestEntry,
    canonical_json,
    content_hash,
    diff_manifests,
    meta_hash,
    shard_of,
    shard_version,
    stat_candidates,
)
from rag_assets.sources import FileStat


def entry(doc_id: str, c: str = "c", m: str = "m", size: int = 1, mtime: int = 1, source: str = "folder"):
    return ManifestEntry(doc_id, shard_of(doc_id, 8), c, m, size, mtime, source)


def test_shard_of_is_stable_forever():
    # Pinned values: if these change, every existing index would move every document.
    assert shard_of("docs/intro.md", 64) == shard_of("docs/intro.md", 64)
    assert [shard_of(f"doc{i}", 64) for i in range(5)] == [shard_of(f"doc{i}", 64) for i in range(5)]
    assert shard_of("a", 64) == 10
    assert shard_of("docs/intro.md", 64) == 47


@given(st.lists(st.text(min_size=1), min_size=1, max_size=50, unique=True), st.integers(1, 99))
def test_shard_in_range(ids, n):
    assert all(0 <= shard_of(i, n) < n for i in ids)


def test_meta_hash_ignores_key_order_not_values():
    assert meta_hash({"a": 1, "b": [1, 2]}) == meta_hash({"b": [1, 2], "a": 1})
    assert meta_hash({"a": 1}) != meta_hash({"a": 2})
    assert canonical_json({"é": "ü"}) == '{"é":"ü"}'


def test_content_hash_is_sha256_of_utf8():
    assert content_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_diff_classifies_every_kind():
    old = {d: entry(d) for d in ("same", "edit", "meta", "gone")}
    new = {
        "same": entry("same"),
        "edit": entry("edit", c="c2"),
        "meta": entry("meta", m="m2"),
        "new": entry("new"),
    }
    d = diff_manifests(old, new)
    assert (d.added, d.modified, d.metadata_only, d.deleted, d.unchanged) == (
        ["new"],
        ["edit"],
        ["meta"],
        ["gone"],
        ["same"],
    )
    assert d.stale_shards == {shard_of(x, 8) for x in ("new", "edit", "meta", "gone")}
    assert d.changed


def test_no_change_diff_is_empty():
    old = {d: entry(d) for d in ("a", "b")}
    d = diff_manifests(old, dict(old))
    assert not d.changed and d.stale_shards == set()


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=5), st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=20
    ),
    st.dictionaries(
        st.text(min_size=1, max_size=5), st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=20
    ),
)
def test_diff_partitions_the_union(a, b):
    old = {k: entry(k, c=str(v[0]), m=str(v[1])) for k, v in a.items()}
    new = {k: entry(k, c=str(v[0]), m=str(v[1])) for k, v in b.items()}
    d = diff_manifests(old, new)
    parts = d.added + d.modified + d.metadata_only + d.deleted + d.unchanged
    assert sorted(parts) == sorted(set(a) | set(b))
    assert len(parts) == len(set(parts))


def test_shard_version_is_order_independent_and_content_sensitive():
    es = [entry("a"), entry("b", c="x")]
    assert shard_version(es) == shard_version(list(reversed(es)))
    assert shard_version(es) != shard_version([entry("a"), entry("b", c="y")])
    assert shard_version([]) == shard_version([])


def test_stat_fast_path_rereads_only_changed_files():
    old = {"a": entry("a", size=10, mtime=5), "b": entry("b", size=10, mtime=5), "c": entry("c")}
    stats = {"a": FileStat(10, 5), "b": FileStat(10, 6), "d": FileStat(1, 1)}
    shards, reread = stat_candidates(stats, old, 8)
    assert sorted(reread) == ["b", "d"]
    assert shards == {shard_of("b", 8), shard_of("d", 8), shard_of("c", 8)}
