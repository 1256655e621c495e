"""``rag-assets export``: the live serving rows as Parquet or JSON Lines, streamed in batches."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("doc_id", pa.string()),
        ("shard", pa.int16()),
        ("seq", pa.int32()),
        ("text", pa.string()),
        ("metadata", pa.string()),  # canonical JSON
        ("embedding", pa.list_(pa.float32())),
    ]
)


def _floats(v) -> list[float]:
    """A pgvector value as a list (numpy array in text mode, ``Vector`` in binary mode)."""
    return v.to_list() if hasattr(v, "to_list") else v.tolist()


def _table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    return pa.table(
        [
            pa.array(cols[0], pa.string()),
            pa.array(cols[1], pa.string()),
            pa.array(cols[2], pa.int16()),
            pa.array(cols[3], pa.int32()),
            pa.array(cols[4], pa.string()),
            pa.array([json.dumps(m, sort_keys=True, ensure_ascii=False) for m in cols[5]]),
            pa.array([_floats(e) for e in cols[6]], pa.list_(pa.float32())),
        ],
        schema=SCHEMA,
    )


def export_rows(conn: psycopg.Connection, path: Path, fmt: str = "parquet", batch: int = 5000) -> int:
    """Write every serving row of the live generation, ordered by (doc_id, seq). Returns the count."""
    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"unknown export format {fmt!r}: use parquet or jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with conn.transaction(), conn.cursor(name="export_rows") as cur:
        cur.itersize = batch
        try:
            cur.execute(
                "SELECT chunk_id, doc_id, shard, seq, text, metadata, embedding FROM items ORDER BY doc_id, seq"
            )
        except psycopg.errors.UndefinedTable:
            raise ValueError("the index is empty: run `rag-assets index PATH` first") from None
        with contextlib.ExitStack() as stack:
            if fmt == "parquet":
                writer = stack.enter_context(pq.ParquetWriter(path, SCHEMA, compression="zstd"))
            else:
                fh = stack.enter_context(open(path, "w", encoding="utf-8"))
            while rows := cur.fetchmany(batch):
                n += len(rows)
                if fmt == "parquet":
                    writer.write_table(_table(rows))
                    continue
                for r in rows:
                    fh.write(
                        json.dumps(
                            {
                                "chunk_id": r[0],
                                "doc_id": r[1],
                                "shard": r[2],
                                "seq": r[3],
                                "text": r[4],
                                "metadata": r[5],
                                "embedding": _floats(r[6]),
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
    return n
