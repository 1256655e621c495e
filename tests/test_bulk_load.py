"""The Arrow -> binary COPY loader (rag_assets.store.bulk_load) against a real PostgreSQL + pgvector."""

from __future__ import annotations

import datetime as dt

import numpy as np
import psycopg
import pyarrow as pa
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from rag_assets.store.bulk_load import column_types, copy_arrow, encode_rows

COLS = ["id", "s", "i2", "i8", "f8", "b", "j", "ts", "v"]


@pytest.fixture
def conn(db_url):
    with psycopg.connect(db_url) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute(
            """CREATE TABLE t (id integer PRIMARY KEY, s text COLLATE "C", i2 smallint, i8 bigint,
               f8 double precision, b boolean, j jsonb, ts timestamptz, v vector(3),
               n integer NOT NULL DEFAULT 7)"""
        )
        yield c


def _columns():
    texts = ["plain", None, "tab\there\nnewline \\ back", "é ünïcode ✓", ""]
    ts = [dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC), None,
          dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC), dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
          dt.datetime(2000, 1, 1, tzinfo=dt.UTC)]
    vecs = np.array([[1, 2, 3], [0.5, -0.25, 1e-7], [0, 0, 0], [3.4e38, -1, 2], [7, 8, 9]], np.float32)
    return [
        pa.array([1, 2, 3, 4, 5], pa.int32()),
        pa.array(texts, pa.string()),
        pa.array([1, -2, None, 32767, -32768], pa.int16()),
        pa.array([2**40, None, -1, 0, 9], pa.int64()),
        pa.array([1.5, None, -0.0, 1e300, 2.25], pa.float64()),
        pa.array([True, False, None, True, False]),
        pa.array(['{"a": 1}', None, '{"k": "v\\"q", "n": [1, 2]}', "[]", '"x"'], pa.string()),
        pa.array(ts, pa.timestamp("us", tz="UTC")),
        pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), 3),
    ], texts, ts, vecs


def test_copy_arrow_round_trips_every_supported_type(conn):
    values, texts, ts, vecs = _columns()
    types = column_types(conn, sql.Identifier("t"), COLS)
    assert types == ["int4", "text", "int2", "int8", "float8", "bool", "jsonb", "timestamptz", "vector"]
    with conn.cursor() as cur:
        assert copy_arrow(cur, sql.Identifier("t"), COLS, values, types, rows_per_write=2) == 5
    rows = conn.execute("SELECT id, s, i2, i8, f8, b, j, ts, v::text, n FROM t ORDER BY id").fetchall()
    assert [r[1] for r in rows] == texts
    assert [r[2] for r in rows] == [1, -2, None, 32767, -32768]
    assert [r[3] for r in rows] == [2**40, None, -1, 0, 9]
    assert [r[4] for r in rows] == [1.5, None, -0.0, 1e300, 2.25]
    assert [r[5] for r in rows] == [True, False, None, True, False]
    assert [r[6] for r in rows] == [{"a": 1}, None, {"k": 'v"q', "n": [1, 2]}, [], "x"]
    assert [r[7] for r in rows] == ts
    assert all(r[9] == 7 for r in rows)  # columns not named keep their defaults
    got = np.array([[float(x) for x in r[8].strip("[]").split(",")] for r in rows], np.float32)
    assert np.array_equal(got, vecs)
    # the same rows written by psycopg's own parameter binding compare equal in the database
    conn.execute("CREATE TABLE t2 (LIKE t INCLUDING ALL)")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO t2 (id, s, i2, i8, f8, b, j, ts, v) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::vector)",
            [(*r[:6], None if r[6] is None else Jsonb(r[6]), r[7], r[8]) for r in rows],
        )
    diff = conn.execute(
        "SELECT count(*) FROM (SELECT * FROM t EXCEPT SELECT * FROM t2) x"
    ).fetchone()[0]
    assert diff == 0


def test_a_2d_numpy_array_is_a_vector_column_and_encoding_is_deterministic(conn):
    vecs = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = pa.array([10, 11, 12, 13], pa.int32())
    a = encode_rows(["id", "v"], [ids, vecs], ["int4", "vector"]).to_pybytes()
    b = encode_rows(["id", "v"], [ids, vecs.copy()], ["int4", "vector"]).to_pybytes()
    assert a == b and len(a) == 4 * (2 + 4 + 4 + 4 + 4 + 12)
    with conn.cursor() as cur:
        copy_arrow(cur, sql.Identifier("t"), ["id", "v"], [ids, vecs], ["int4", "vector"])
    assert conn.execute("SELECT v::text FROM t WHERE id = 13").fetchone()[0] == "[9,10,11]"


def test_bad_input_is_a_clear_error_naming_the_column(conn):
    with pytest.raises(TypeError, match="'s'.*expected Arrow strings"):
        encode_rows(["s"], [pa.array([1, 2])], ["text"])
    with pytest.raises(TypeError, match="'p'.*'point' is not supported"):
        encode_rows(["p"], [pa.array(["(1,2)"])], ["point"])
    with pytest.raises(ValueError, match="'i2'.*out of range for int2"):
        encode_rows(["i2"], [pa.array([40000], pa.int32())], ["int2"])
    with pytest.raises(ValueError, match="'v'.*finite"):
        encode_rows(["v"], [np.array([[np.nan, 1.0]], np.float32)], ["vector"])
    with pytest.raises(ValueError, match="no column"):
        column_types(conn, sql.Identifier("t"), ["id", "nope"])
    # the database still checks what it owns: a wrong vector dimension is rejected, nothing written
    with pytest.raises(psycopg.errors.DataException), conn.cursor() as cur:
        copy_arrow(cur, sql.Identifier("t"), ["id", "v"], [pa.array([1], pa.int32()),
                   np.ones((1, 4), np.float32)], ["int4", "vector"])
