"""Should the full-text column cover the heading-path header? A measurement, not a mode.

The structure chunker (v3) stores each chunk as ``"Title › Section\\n\\n" + slice``, and the live
generation's generated ``tsv`` column indexes that whole text. This script rewrites the live
generation's ``tsv`` of an existing index to cover the document slice only (the text after the
header, whose length is the chunk row's span), so ``rag-assets eval --mode keyword|hybrid`` can be
run against both variants on the same chunks and vectors:

    RAG_HOME=/tmp/h rag-assets index samples/corpus --core
    RAG_HOME=/tmp/h rag-assets eval samples/questions/corpus.jsonl --split dev --mode keyword -k 5
    RAG_HOME=/tmp/h python benchmarks/context_tsv.py          # tsv := slice only (no header)
    RAG_HOME=/tmp/h rag-assets eval samples/questions/corpus.jsonl --split dev --mode keyword -k 5

It leaves a plain (not generated) column behind: use a throwaway RAG_HOME. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rag_assets.settings import Settings  # noqa: E402
from rag_assets.store import schema  # noqa: E402
from rag_assets.store.db import connect_index  # noqa: E402
from rag_assets.store.generations import live_generation  # noqa: E402


def main() -> None:
    settings = Settings.from_env()
    with connect_index(settings, autocommit=False) as conn:
        gen = live_generation(conn)
        if gen is None:
            raise SystemExit("no live generation: index first")
        cfg = schema.generation_text_search_config(conn, gen.id) or schema.DEFAULT_TEXT_SEARCH_CONFIG
        items = schema.items_table(gen.id)
        conn.execute("DROP VIEW IF EXISTS items")
        conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN tsv").format(items))
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN tsv tsvector").format(items))
        n = conn.execute(
            sql.SQL(
                "UPDATE {} i SET tsv = to_tsvector({}::regconfig, right(i.text, c.char_end - c.char_start))"
                " FROM chunks c WHERE c.chunk_id = i.chunk_id"
            ).format(items, sql.Literal(cfg))
        ).rowcount
        conn.execute(sql.SQL("COMMENT ON COLUMN {}.tsv IS {}").format(items, sql.Literal(cfg)))
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} USING gin (tsv)").format(sql.Identifier(f"g{gen.id}_items_tsv"), items)
        )
        schema.point_view_at(conn, gen.id)
        conn.commit()
    print(json.dumps({"generation": gen.id, "rows": n, "tsv": "slice only (no heading-path header)"}))


if __name__ == "__main__":
    main()
