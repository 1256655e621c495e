"""The chunk stage: re-chunk exactly the documents whose body or chunker changed, per shard.

It is level-triggered: each shard records in ``shard_state.chunks_version`` which manifest version
(and chunker version) its chunks reflect, so a shard whose previous run crashed, or that was
never chunked, is simply "behind" and is caught up on the next run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg

from rag_assets.chunking import Chunker
from rag_assets.store.db import analyze_if_changed, lock_shards
from rag_assets.tokens import count_tokens_batch


@dataclass
class ChunkStats:
    shards: int = 0
    docs_rechunked: int = 0
    docs_meta_updated: int = 0
    docs_dropped: int = 0
    chunks_written: int = 0
    chunks_deleted: int = 0
    seconds_chunking: float = 0.0


def chunk_id(doc_id: str, chunk_hash: str, occurrence: int) -> str:
    """Identity of a chunk within its document, independent of its position (seq)."""
    key = f"{doc_id}\x00{chunk_hash}\x00{occurrence}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(key).hexdigest()[:32]


def zip_chunk_ids(doc_id: str, chunks: list) -> list[tuple[str, object]]:
    """(chunk_id, chunk) pairs; a text repeated in a document gets occurrences 0, 1, ..."""
    seen: dict[str, int] = {}
    out = []
    for c in chunks:
        k = seen.get(c.chunk_hash, 0)
        seen[c.chunk_hash] = k + 1
        out.append((chunk_id(doc_id, c.chunk_hash, k), c))
    return out


def chunks_version(manifest_version: str, chunker_version: str) -> str:
    return f"{manifest_version}|{chunker_version}"


def lagging_chunk_shards(conn: psycopg.Connection, chunker_version: str) -> set[int]:
    rows = conn.execute(
        "SELECT shard FROM shard_state WHERE chunks_version <> manifest_version || '|' || %s",
        (chunker_version,),
    ).fetchall()
    return {r[0] for r in rows}


def sync_chunks(
    conn: psycopg.Connection, shards: Iterable[int], chunker: Chunker, *, force: bool = False
) -> ChunkStats:
    """Bring the chunks of ``shards`` in line with the manifest, in one transaction."""
    import time

    st = ChunkStats()
    shards = sorted(set(shards))
    with conn.transaction():
        lock_shards(conn, shards)
        state = conn.execute(
            "SELECT shard, manifest_version, chunks_version FROM shard_state WHERE shard = ANY(%s)",
            (shards,),
        ).fetchall()
        todo = {
            s: chunks_version(mv, chunker.version)
            for s, mv, cv in state
            if force or cv != chunks_version(mv, chunker.version)
        }
        if not todo:
            return st
        st.shards = len(todo)
        todo_shards = sorted(todo)
        manifest = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT doc_id, content_hash, meta_hash FROM manifest WHERE shard = ANY(%s)",
                (todo_shards,),
            )
        }
        chunked = {
            r[0]: (r[1], r[2], r[3])
            for r in conn.execute(
                "SELECT doc_id, content_hash, meta_hash, chunker_version FROM chunk_docs WHERE shard = ANY(%s)",
                (todo_shards,),
            )
        }
        rechunk: list[str] = []
        meta_only: list[str] = []
        for doc_id, (ch, mh) in manifest.items():
            prev = chunked.get(doc_id)
            if force or prev is None or prev[0] != ch or prev[2] != chunker.version:
                rechunk.append(doc_id)
            elif prev[1] != mh:
                meta_only.append(doc_id)
        dropped = [d for d in chunked if d not in manifest]
        st.docs_rechunked, st.docs_meta_updated, st.docs_dropped = len(rechunk), len(meta_only), len(dropped)

        with conn.cursor() as cur:
            gone = rechunk + dropped
            # Token counts of texts we already have (most chunks of an edited document are unchanged):
            # only texts never seen are tokenized.
            known_tokens = (
                dict(
                    cur.execute(
                        "SELECT chunk_hash, n_tokens FROM chunks WHERE doc_id = ANY(%s)", (rechunk,)
                    ).fetchall()
                )
                if rechunk and not force
                else {}
            )
            if gone:
                cur.execute("DELETE FROM chunks WHERE doc_id = ANY(%s)", (gone,))
                st.chunks_deleted = cur.rowcount
            if dropped:
                cur.execute("DELETE FROM chunk_docs WHERE doc_id = ANY(%s)", (dropped,))
            if rechunk:
                cur.execute(
                    "SELECT b.doc_id, b.body, m.shard FROM document_bodies b "
                    "JOIN manifest m USING (doc_id) WHERE b.doc_id = ANY(%s)",
                    (rechunk,),
                )
                bodies = cur.fetchall()
                if len(bodies) != len(rechunk):
                    have = {b[0] for b in bodies}
                    missing = [d for d in rechunk if d not in have][:5]
                    raise RuntimeError(
                        f"document bodies missing for {missing}; run `rag-assets index --full`"
                    )
                t0 = time.perf_counter()
                rows = [
                    (doc_id, shard, cid, c)
                    for doc_id, body, shard in bodies
                    for cid, c in zip_chunk_ids(doc_id, chunker.chunk(body))
                ]
                unknown = sorted(
                    {c.chunk_hash: c.text for *_, c in rows if c.chunk_hash not in known_tokens}.items()
                )
                known_tokens.update(
                    zip([h for h, _ in unknown], count_tokens_batch([t for _, t in unknown]), strict=True)
                )
                tokens = [known_tokens[c.chunk_hash] for *_, c in rows]  # exact cl100k, for cost accounting
                with cur.copy(
                    "COPY chunks (doc_id, seq, shard, chunk_id, chunk_hash, text, char_start, char_end, n_tokens)"
                    " FROM STDIN (FORMAT BINARY)"
                ) as cp:
                    cp.set_types(["text", "int4", "int2", "text", "text", "text", "int4", "int4", "int4"])
                    for (doc_id, shard, cid, c), n in zip(rows, tokens, strict=True):
                        cp.write_row((doc_id, c.seq, shard, cid, c.chunk_hash, c.text, c.start, c.end, n))
                st.chunks_written = len(rows)
                st.seconds_chunking = time.perf_counter() - t0
            upd = rechunk + meta_only
            if upd:
                cur.execute(
                    """INSERT INTO chunk_docs (doc_id, shard, content_hash, meta_hash, metadata, chunker_version)
                       SELECT doc_id, shard, content_hash, meta_hash, metadata, %s FROM manifest
                       WHERE doc_id = ANY(%s)
                       ON CONFLICT (doc_id) DO UPDATE SET shard = EXCLUDED.shard,
                           content_hash = EXCLUDED.content_hash, meta_hash = EXCLUDED.meta_hash,
                           metadata = EXCLUDED.metadata, chunker_version = EXCLUDED.chunker_version""",
                    (chunker.version, upd),
                )
            cur.executemany(
                "UPDATE shard_state SET chunks_version = %s, updated_at = now() WHERE shard = %s",
                [(v, s) for s, v in todo.items()],
            )
    analyze_if_changed(conn, "chunks", st.chunks_written + st.chunks_deleted)
    analyze_if_changed(conn, "chunk_docs", st.docs_rechunked + st.docs_dropped)
    return st
