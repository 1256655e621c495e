"""Bulk load: binary COPY straight from Arrow columns, encoded by Arrow kernels, not row by row.

``cursor.copy(...).write_row`` formats every value in Python (one call per row and per value, a
pgvector ``Vector`` object per embedding); at 100k documents that was most of a restore's client
time. Here each column becomes, in one vectorised pass, its PostgreSQL binary field (a 4-byte
length, plus a type header such as jsonb's version byte, then the value's bytes); one
``binary_join_element_wise`` lays the fields out row after row, and the resulting buffer *is*
the body of a ``COPY ... FROM STDIN (FORMAT BINARY)`` stream. Python touches columns, never rows.

Reusable by any bulk writer (restore, a generation sync): :func:`copy_arrow` takes a table, the
column names, the values column by column (Arrow arrays, or a 2-D ``float32`` array for vectors)
and their PostgreSQL type names (:func:`column_types` reads them from the catalog).

:func:`drop_indexes_for_load` / :func:`rebuild_indexes` drop a table's indexes for a load into an
empty table and build each once afterwards (cheaper than maintaining them row by row).

Supported types: text (varchar, bpchar, name), int2/int4/int8, float4/float8, bool, jsonb
(values are JSON text), timestamptz/timestamp (Arrow timestamps), vector (pgvector). Any other
type is a clear ``TypeError`` naming the column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER = b"\xff\xff"
ROWS_PER_WRITE = 16_384  # rows encoded per buffer: bounds the encoder's memory, keeps offsets in int32

_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970-01-01 (PostgreSQL's epoch)
_TEXT = {"text", "varchar", "bpchar", "name"}
_FIXED = {"int2": ">i2", "int4": ">i4", "int8": ">i8", "float4": ">f4", "float8": ">f8", "bool": "u1"}


def column_types(conn: psycopg.Connection, table: sql.Composable, columns: Sequence[str]) -> list[str]:
    """The PostgreSQL type names (``pg_type.typname``) of ``columns`` of ``table``, in that order."""
    rows = dict(
        conn.execute(
            """SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
               WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped""",
            (table.as_string(conn),),
        ).fetchall()
    )
    missing = [c for c in columns if c not in rows]
    if missing:
        raise ValueError(f"table {table.as_string(conn)} has no column(s) {missing}")
    return [rows[c] for c in columns]


def _fixed_binary(raw: np.ndarray, width: int) -> pa.Array:
    """``raw`` (n rows of ``width`` bytes, C-contiguous) as a variable-width binary array."""
    n = raw.shape[0]
    buf = pa.py_buffer(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, buf]).cast(pa.binary())


def _headers(lengths: np.ndarray, valid: np.ndarray, extra: bytes = b"") -> pa.Array:
    """Per row: the field's 4-byte big-endian length (-1 for NULL), followed by ``extra`` when not NULL.

    A NULL row gets the 4-byte -1 only; ``extra`` (jsonb's version byte) counts in the length.
    """
    n = len(lengths)
    lens = np.where(valid, lengths + len(extra), -1).astype(">i4")
    if not extra:
        return _fixed_binary(lens.view(np.uint8).reshape(n, 4), 4)
    raw = np.empty((n, 4 + len(extra)), np.uint8)
    raw[:, :4] = lens.view(np.uint8).reshape(n, 4)
    raw[:, 4:] = np.frombuffer(extra, np.uint8)
    fields = _fixed_binary(raw, 4 + len(extra))
    if valid.all():
        return fields
    return pc.if_else(pa.array(valid), fields, pa.scalar(b"\xff\xff\xff\xff", pa.binary()))


def _valid(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), bool)
    return pc.is_valid(arr).to_numpy(zero_copy_only=False)


def _encode(name: str, typ: str, values, n: int) -> tuple[pa.Array, pa.Array | None]:
    """(header, value) binary arrays of one column: the field is their concatenation, row by row."""
    if typ == "vector":
        vecs = values
        if isinstance(vecs, pa.ChunkedArray):
            vecs = vecs.combine_chunks()
        if isinstance(vecs, pa.FixedSizeListArray):
            if vecs.null_count:
                raise ValueError(f"column {name!r}: NULL vectors are not supported")
            dims = vecs.type.list_size
            vecs = vecs.flatten().to_numpy(zero_copy_only=False).reshape(len(vecs), dims)
        vecs = np.asarray(vecs)
        if vecs.ndim != 2 or vecs.shape[0] != n:
            raise ValueError(f"column {name!r}: expected {n} vectors as a 2-D array, got shape {vecs.shape}")
        dims = vecs.shape[1]
        if not 1 <= dims <= 16000 or not np.isfinite(vecs).all():
            raise ValueError(f"column {name!r}: vectors need 1-16000 finite dimensions")
        raw = np.empty((n, 8 + 4 * dims), np.uint8)
        raw[:, :4] = np.frombuffer(np.array([4 + 4 * dims], ">i4").tobytes(), np.uint8)
        raw[:, 4:8] = np.frombuffer(np.array([dims, 0], ">i2").tobytes(), np.uint8)
        raw[:, 8:] = vecs.astype(">f4", copy=False).view(np.uint8).reshape(n, 4 * dims)
        return _fixed_binary(raw, 8 + 4 * dims), None
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if not isinstance(arr, pa.Array):
        arr = pa.array(arr)
    if len(arr) != n:
        raise ValueError(f"column {name!r}: {len(arr)} values for {n} rows")
    valid = _valid(arr)
    if typ in _TEXT or typ == "jsonb":
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise TypeError(f"column {name!r} ({typ}): expected Arrow strings, got {arr.type}")
        data = arr.cast(pa.binary()) if pa.types.is_string(arr.type) else arr.cast(pa.large_binary()).cast(
            pa.binary()
        )
        lengths = pc.binary_length(data).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        head = _headers(lengths, valid, b"\x01" if typ == "jsonb" else b"")
        return head, data.fill_null(b"")
    if typ in ("timestamptz", "timestamp"):
        if not pa.types.is_timestamp(arr.type):
            raise TypeError(f"column {name!r} ({typ}): expected an Arrow timestamp, got {arr.type}")
        us = arr.cast(pa.timestamp("us", tz=arr.type.tz)).cast(pa.int64()).fill_null(0)
        ints = us.to_numpy(zero_copy_only=False).astype(np.int64) - _PG_EPOCH_US
        dtype = ">i8"
    elif typ in _FIXED:
        dtype = _FIXED[typ]
        if typ == "bool":
            if not pa.types.is_boolean(arr.type):
                raise TypeError(f"column {name!r} (bool): expected Arrow booleans, got {arr.type}")
            ints = arr.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint8)
        else:
            if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
                raise TypeError(f"column {name!r} ({typ}): expected Arrow numbers, got {arr.type}")
            ints = arr.fill_null(0).to_numpy(zero_copy_only=False)
            if typ.startswith("int"):
                info = np.iinfo(np.dtype(dtype))
                if len(ints) and (ints.min() < info.min or ints.max() > info.max):
                    raise ValueError(f"column {name!r}: a value is out of range for {typ}")
    else:
        raise TypeError(f"column {name!r}: PostgreSQL type {typ!r} is not supported by the bulk loader")
    width = np.dtype(dtype).itemsize
    vals = np.ascontiguousarray(ints.astype(dtype))
    head = _headers(np.full(n, width, np.int64), valid)
    body = _fixed_binary(vals.view(np.uint8).reshape(n, width), width)
    if not valid.all():
        body = pc.if_else(pa.array(valid), body, pa.scalar(b"", pa.binary()))
    return head, body


def encode_rows(names: Sequence[str], values: Sequence, types: Sequence[str]) -> pa.Buffer:
    """The rows of a binary COPY stream (no signature, no trailer) for columns given as arrays.

    Pure: the same columns give the same bytes. ``values[i]`` holds column ``names[i]`` of every
    row (an Arrow array, or for a ``vector`` column a FixedSizeList array or 2-D numpy array).
    """
    if not (len(names) == len(values) == len(types)) or not names:
        raise ValueError("encode_rows needs as many names, value columns and types, at least one")
    n = len(values[0]) if not isinstance(values[0], np.ndarray) else values[0].shape[0]
    if n == 0:
        return pa.py_buffer(b"")
    parts: list[pa.Array] = [_fixed_binary(np.tile(np.array([len(names)], ">i2").view(np.uint8), (n, 1)), 2)]
    for name, vals, typ in zip(names, values, types, strict=True):
        head, body = _encode(name, typ, vals, n)
        parts.append(head)
        if body is not None:
            parts.append(body)
    rows = pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.binary()))
    offsets = np.frombuffer(rows.buffers()[1], np.int32, count=n + 1, offset=rows.offset * 4)
    return rows.buffers()[2][int(offsets[0]) : int(offsets[-1])]


def copy_arrow(
    cur: psycopg.Cursor,
    table: sql.Composable,
    columns: Sequence[str],
    values: Sequence,
    types: Sequence[str],
    *,
    rows_per_write: int = ROWS_PER_WRITE,
) -> int:
    """``COPY table (columns) FROM STDIN (FORMAT BINARY)`` of rows given column by column.

    ``values[i]`` holds column ``columns[i]`` for every row; ``types[i]`` is its PostgreSQL type
    name (:func:`column_types`). Rows are encoded ``rows_per_write`` at a time by :func:`encode_rows`
    and streamed; runs in the cursor's transaction. Returns the number of rows written.
    """
    if not columns:
        raise ValueError("copy_arrow needs at least one column")
    n = values[0].shape[0] if isinstance(values[0], np.ndarray) else len(values[0])
    stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        table, sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    )
    with cur.copy(stmt) as cp:
        cp.write(COPY_SIGNATURE)
        for lo in range(0, n, rows_per_write):
            hi = min(n, lo + rows_per_write)
            chunk = [v[lo:hi] for v in values]
            cp.write(encode_rows(columns, chunk, types))
        cp.write(COPY_TRAILER)
    return n


@dataclass(frozen=True)
class DeferredIndex:
    """One index (or the constraint it backs) dropped for a bulk load, with the SQL that rebuilds it."""

    name: str
    drop: sql.Composed
    create: str


def drop_indexes_for_load(conn: psycopg.Connection, table: sql.Composable) -> list[DeferredIndex]:
    """Drop ``table``'s indexes (primary key and unique constraints included) for a bulk load.

    Building an index once over loaded rows is several times cheaper than maintaining it row by
    row (measured for a generation's tables: GIN on the tsvector, btrees on text keys). Returns
    what :func:`rebuild_indexes` needs to recreate them exactly as they were (``pg_get_indexdef``,
    ``pg_get_constraintdef``, same names). Indexes that a foreign key depends on are kept. Call it
    inside the loading transaction: if the load fails, the rollback brings the indexes back too.
    """
    reg = table.as_string(conn)
    rows = conn.execute(
        """SELECT n.nspname, ci.relname, pg_get_indexdef(i.indexrelid), con.conname,
                  pg_get_constraintdef(con.oid),
                  EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = i.indexrelid)
           FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid JOIN pg_namespace n ON n.oid = ci.relnamespace
           LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                                        AND con.contype IN ('p', 'u')
           WHERE i.indrelid = to_regclass(%s) ORDER BY ci.relname""",
        (reg,),
    ).fetchall()
    out: list[DeferredIndex] = []
    for nsp, index_name, index_def, con_name, con_def, referenced in rows:
        if referenced:
            continue
        if con_name:
            drop = sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(table, sql.Identifier(con_name))
            create = sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(table, sql.Identifier(con_name))
            out.append(DeferredIndex(con_name, drop, create.as_string(conn) + con_def))
        else:
            # pg_get_indexdef names the table schema-qualified: rebuilt where it was, whatever the search_path
            drop = sql.SQL("DROP INDEX {}").format(sql.Identifier(nsp, index_name))
            out.append(DeferredIndex(index_name, drop, index_def))
    for d in out:
        conn.execute(d.drop)
    return out


def rebuild_indexes(conn: psycopg.Connection, dropped: Sequence[DeferredIndex]) -> None:
    """Recreate what :func:`drop_indexes_for_load` dropped (a duplicate key fails here, naming it)."""
    for d in dropped:
        conn.execute(d.create)
