"""Pieces: the Parquet files that hold a few documents of one shard, and the trees that list them.

Pieces, not whole shards. A random 1% change of the documents touches most of the 64 shards, so
per-shard objects would rewrite most of the bytes. Each shard is therefore split into pieces by a
binary trie over ``sha256(doc_id)[8:16]`` (bits independent of the shard hash): a trie node is
split while it holds more than ``piece_max_docs`` documents (or more than ``piece_max_bytes``
estimated bytes). The split depends only on the documents in that node, so an edit, insert or
delete rewrites one piece (two when a node splits or merges), and a 1% change rewrites about
``1% × (mean docs per piece, size-biased)`` ≈ 3–4% of the bytes with the default of 4 (measured:
3.6–3.9%; one object per shard would rewrite ~28% for 2,000 documents in 64 shards). The cost is
more, smaller objects (~3 documents each), so more requests per full snapshot or restore.
The layout parameters are recorded, and a new snapshot reuses the previous snapshot's values.

A piece is one Parquet file with one row per document: its ``manifest`` row, its body
(``document_bodies``), its ``chunk_docs`` row, and a nested list of its chunks
(its ``chunks`` rows plus the serving vector). A chunk's text is stored only
when it is not exactly ``body[char_start:char_end]`` (the chunker's contract), which halves the
text bytes. Restore rebuilds every bookkeeping table and the serving tables from these rows.

Writing (:func:`shard_table`, :func:`parquet_bytes`) and reading (:func:`parse_piece`) live here
together with the checks every read object passes (:func:`get_verified`: size and SHA-256;
:func:`validate_tree`), so create, verify, restore and prune agree on one format.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rag_assets.snapshots.layout import TREE_FORMAT, SnapshotError, check_key, is_count, key_sha256
from rag_assets.snapshots.stores import SnapshotStore

# Fixed writer options: with the same pyarrow version, equal tables give byte-identical files
# (checked by the tests). ``created_by`` names the pyarrow version, so an upgrade re-uploads
# each piece once; that costs bytes, never correctness (restore checks hashes and the digest).
PARQUET_OPTIONS: dict = {
    "version": "2.6",
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,  # pieces hold a few rows: dictionary pages would only add bytes
    "write_statistics": False,
    "store_schema": False,  # the schema is ours and fixed; saves ~1 KB per object
    "data_page_version": "1.0",
    "write_page_index": False,
    "use_byte_stream_split": ["chunks.list.element.embedding.list.element"],
}


@functools.lru_cache(maxsize=16)
def piece_schema(dims: int) -> pa.Schema:
    """The Arrow schema of a piece for ``dims``-dimensional vectors (one row per document)."""
    chunk = pa.struct(
        [
            ("seq", pa.int32()),
            ("chunk_id", pa.string()),
            ("chunk_hash", pa.string()),
            ("text", pa.string()),  # null: equal to body[char_start:char_end]
            ("char_start", pa.int32()),
            ("char_end", pa.int32()),
            ("n_tokens", pa.int32()),
            ("embedding", pa.list_(pa.float32(), dims)),
        ]
    )
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("shard", pa.int16()),
            # manifest (source is null when the document has no manifest row)
            ("source", pa.string()),
            ("content_hash", pa.string()),
            ("meta_hash", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("metadata", pa.string()),  # jsonb text as PostgreSQL prints it
            ("source_time", pa.timestamp("us", tz="UTC")),
            # document_bodies (null: no row)
            ("body", pa.string()),
            # chunk_docs (cd_chunker_version is null when the document has no row; the other
            # cd_ columns are null when equal to the manifest's value, as they are once chunked)
            ("cd_content_hash", pa.string()),
            ("cd_meta_hash", pa.string()),
            ("cd_metadata", pa.string()),
            ("cd_chunker_version", pa.string()),
            ("chunks", pa.list_(chunk)),
        ]
    )


def _piece_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()[8:16], "big")


def _id_key(doc_id: str) -> bytes:
    return doc_id.encode("utf-8", "surrogatepass")  # PostgreSQL's "C" collation order


def split_pieces(doc_ids: list[str], weights: list[int], max_docs: int, max_bytes: int) -> list[list[int]]:
    """Partition documents into pieces by a binary trie over their hash; content-defined and local.

    Returns lists of indexes into ``doc_ids`` (each sorted by doc id), in trie order. A node is a
    leaf when it holds at most ``max_docs`` documents whose weights sum to at most ``max_bytes``
    (or a single document), so whether a node splits depends only on the documents inside it.
    """
    n = len(doc_ids)
    if n == 0:
        return []
    hs = [_piece_hash(d) for d in doc_ids]
    order = sorted(range(n), key=lambda i: (hs[i], _id_key(doc_ids[i])))
    sh = [hs[i] for i in order]
    cum = [0]
    for i in order:
        cum.append(cum[-1] + weights[i])
    out: list[list[int]] = []
    stack = [(0, n, 0, 0)]  # (lo, hi, depth, base) ; popped in trie order
    while stack:
        lo, hi, depth, base = stack.pop()
        if lo == hi:
            continue
        count = hi - lo
        if depth >= 64 or (count <= max_docs and (count == 1 or cum[hi] - cum[lo] <= max_bytes)):
            out.append(sorted(order[lo:hi], key=lambda i: _id_key(doc_ids[i])))
            continue
        mid_value = base + (1 << (63 - depth))
        mid = bisect.bisect_left(sh, mid_value, lo, hi)
        stack.append((mid, hi, depth + 1, mid_value))
        stack.append((lo, mid, depth + 1, base))
    return out


@dataclass
class PieceDoc:
    """One document of a shard as read from the database: the contents of one piece row."""

    doc_id: str
    shard: int
    manifest: tuple | None = None  # (source, content_hash, meta_hash, size, mtime_ns, metadata, source_time)
    body: str | None = None
    chunk_doc: tuple | None = None  # (content_hash, meta_hash, metadata, chunker_version)
    chunks: list = field(default_factory=list)  # (seq, chunk_id, chunk_hash, text, start, end, n_tokens, row)
    weight: int = 0


def shard_table(docs: list[PieceDoc], vectors: np.ndarray, dims: int) -> pa.Table:
    """One Arrow table with ``docs`` in the given order (pieces are slices of it)."""
    sch = piece_schema(dims)
    chunk_type = sch.field("chunks").type.value_type

    def mcol(i):
        return [d.manifest[i] if d.manifest else None for d in docs]

    def ccol(i):
        return [d.chunk_doc[i] if d.chunk_doc else None for d in docs]

    flat = [c for d in docs for c in d.chunks]
    offsets = np.zeros(len(docs) + 1, dtype=np.int32)
    np.cumsum([len(d.chunks) for d in docs], out=offsets[1:])
    rows_idx = np.fromiter((c[7] for c in flat), dtype=np.int64, count=len(flat))
    emb = vectors[rows_idx] if len(flat) else np.zeros((0, dims), np.float32)
    chunk_arr = pa.StructArray.from_arrays(
        [
            pa.array([c[0] for c in flat], pa.int32()),
            pa.array([c[1] for c in flat], pa.string()),
            pa.array([c[2] for c in flat], pa.string()),
            pa.array([c[3] for c in flat], pa.string()),
            pa.array([c[4] for c in flat], pa.int32()),
            pa.array([c[5] for c in flat], pa.int32()),
            pa.array([c[6] for c in flat], pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dims),
        ],
        fields=list(chunk_type),
    )
    cols = [
        pa.array([d.doc_id for d in docs], pa.string()),
        pa.array([d.shard for d in docs], pa.int16()),
        pa.array(mcol(0), pa.string()),
        pa.array(mcol(1), pa.string()),
        pa.array(mcol(2), pa.string()),
        pa.array(mcol(3), pa.int64()),
        pa.array(mcol(4), pa.int64()),
        pa.array(mcol(5), pa.string()),
        pa.array(mcol(6), pa.timestamp("us", tz="UTC")),
        pa.array([d.body for d in docs], pa.string()),
        pa.array(ccol(0), pa.string()),
        pa.array(ccol(1), pa.string()),
        pa.array(ccol(2), pa.string()),
        pa.array(ccol(3), pa.string()),
        pa.ListArray.from_arrays(pa.array(offsets), chunk_arr),
    ]
    return pa.Table.from_arrays(cols, schema=sch)


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes with the fixed writer options (deterministic: same rows, same key)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=max(1, table.num_rows), **PARQUET_OPTIONS)
    return buf.getvalue().to_pybytes()


def validate_tree(data: bytes, key: str, shard: int) -> list[list]:
    """The piece entries ``[key, bytes, docs, chunks]`` of a shard tree, checked; else an error naming it."""
    where = f"shard {shard} tree {key}"
    try:
        tree = json.loads(data)
    except ValueError as e:
        raise SnapshotError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(tree, dict) or tree.get("format") != TREE_FORMAT or tree.get("shard") != shard:
        raise SnapshotError(f"{where}: not the tree of shard {shard}")
    pieces = tree.get("pieces")
    if not isinstance(pieces, list):
        raise SnapshotError(f"{where}: no piece list")
    for p in pieces:
        if not (isinstance(p, list) and len(p) == 4):
            raise SnapshotError(f"{where}: malformed piece entry")
        try:
            pkey = check_key(p[0])
        except SnapshotError as e:
            raise SnapshotError(f"{where}: {e}") from None
        if not pkey.endswith(".parquet") or not all(is_count(v) for v in p[1:]):
            raise SnapshotError(f"{where}: malformed piece entry {pkey!r}")
    return pieces


def get_verified(store: SnapshotStore, key: str, size: int | None, where: str) -> bytes:
    """An object's bytes, checked against ``size`` (when known) and the SHA-256 its key promises."""
    try:
        data = store.get(key)
    except SnapshotError as e:
        raise SnapshotError(f"{where}: object {key} is missing or unreadable ({e})") from None
    if size is not None and len(data) != size:
        raise SnapshotError(
            f"{where}: object {key} has {len(data)} bytes, expected {size} (truncated or damaged)"
        )
    if hashlib.sha256(data).hexdigest() != key_sha256(key):
        raise SnapshotError(f"{where}: object {key} fails its SHA-256 checksum (corrupted)")
    return data


@dataclass(frozen=True)
class Piece:
    """One piece named by a shard tree: its key, size in bytes and counts (checked when it is read)."""

    shard: int
    key: str
    size: int
    docs: int
    chunks: int


def _check_piece(t: pa.Table, p: Piece, dims: int) -> pa.Table:
    """Row counts, shard and columns of one decoded piece (types are checked per batch by a cast)."""
    where = f"shard {p.shard} object {p.key}"
    if t.schema.names != piece_schema(dims).names:
        raise SnapshotError(f"{where}: unexpected columns {t.schema.names}")
    if t.num_rows != p.docs:
        raise SnapshotError(f"{where}: {t.num_rows} documents, the tree says {p.docs}")
    try:
        chunks = t.column("chunks")
        n_chunks = sum(int(c.offsets[-1].as_py() - c.offsets[0].as_py()) for c in chunks.chunks if len(c))
        lo, hi = pc.min_max(t.column("shard")).values()
        lo, hi = lo.as_py(), hi.as_py()
    except (pa.ArrowException, TypeError, AttributeError) as e:
        raise SnapshotError(f"{where}: columns do not have the expected types ({e})") from None
    if n_chunks != p.chunks:
        raise SnapshotError(f"{where}: {n_chunks} chunks, the tree says {p.chunks}")
    if t.num_rows and (lo != p.shard or hi != p.shard):
        raise SnapshotError(f"{where}: holds rows of another shard")
    if t.column("doc_id").null_count:
        raise SnapshotError(f"{where}: null doc_id")
    return t


def parse_piece(data: bytes, p: Piece, dims: int, *, footer_only: bool = False) -> pa.Table | None:
    """Decode a piece (or, with ``footer_only``, check its Parquet footer, columns and row count)."""
    try:
        f = pq.ParquetFile(pa.BufferReader(data))
        if footer_only:
            names = f.schema_arrow.names
            if names != piece_schema(dims).names:
                raise SnapshotError(f"shard {p.shard} object {p.key}: unexpected columns {names}")
            if f.metadata.num_rows != p.docs:
                raise SnapshotError(
                    f"shard {p.shard} object {p.key}: {f.metadata.num_rows} documents, the tree says {p.docs}"
                )
            return None
        t = f.read(use_threads=False)  # tiny files: the caller decodes many in parallel instead
    except (pa.ArrowException, OSError, ValueError) as e:
        raise SnapshotError(f"shard {p.shard} object {p.key}: not a readable Parquet file ({e})") from None
    return _check_piece(t, p, dims)
