"""``rag-assets plan``: what switching to the configured embedder and chunker will embed and cost,
before any backfill starts.

The index's current chunks are reused when the configured chunker is the one they were made with;
otherwise every stored document body is chunked again in memory (the same chunker code the chunk
stage runs). Texts already in the shared embedding cache under the configured embedder's
fingerprint cost nothing: the plan counts only distinct texts missing from it, and their tokens at
the configured price (exact token counts of the stored chunks, cl100k for new texts, plus the
passage prefix of an asymmetric model once per text: it is sent and billed with each).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import psycopg

from rag_assets.chunking import make_chunker
from rag_assets.embedders import embedder_fingerprint, make_embedder
from rag_assets.embedders.asymmetric import InputStyle
from rag_assets.embedders.pricing import lookup_price
from rag_assets.settings import Settings
from rag_assets.tokens import count_tokens_batch


@dataclass(frozen=True)
class SwitchPlan:
    embedder: str
    chunker: str
    live_embedder: str | None
    live_chunker: str | None
    new_generation: bool  # the configuration differs from the live generation's: a backfill builds a new one
    rechunk: bool  # the chunker changed: every document is chunked again
    documents: int
    chunks: int
    texts_to_embed: int
    tokens_to_embed: int
    texts_cached: int
    price_per_mtok: float
    price_known: bool
    cost_usd: float

    def as_dict(self) -> dict:
        return asdict(self)


def _live(conn: psycopg.Connection) -> tuple[str | None, str | None]:
    row = conn.execute(
        """SELECT e.fingerprint, g.chunker_version FROM live l JOIN generations g ON g.id = l.generation
           JOIN rag_cache.embedders e ON e.id = g.embedder_id"""
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def plan_switch(conn: psycopg.Connection, settings: Settings) -> SwitchPlan:
    fingerprint = embedder_fingerprint(settings)
    chunker = make_chunker(settings.chunker, settings.chunk_max_tokens)
    live_fp, live_cv = _live(conn)
    stored = {r[0] for r in conn.execute("SELECT DISTINCT chunker_version FROM chunk_docs")}
    rechunk = bool(stored) and stored != {chunker.version}
    if rechunk:
        texts: dict[str, tuple[str, int | None]] = {}
        n_chunks = 0
        for (body,) in conn.execute("SELECT body FROM document_bodies"):
            for c in chunker.chunk(body):
                n_chunks += 1
                texts.setdefault(c.chunk_hash, (c.text, None))
    else:
        rows = conn.execute("SELECT chunk_hash, n_tokens FROM chunks").fetchall()
        n_chunks = len(rows)
        texts = {h: ("", n) for h, n in rows}
    cached = {
        r[0]
        for r in conn.execute(
            """SELECT c.chunk_hash FROM rag_cache.embedding_cache c JOIN rag_cache.embedders e ON e.id = c.embedder_id
               WHERE e.fingerprint = %s AND c.chunk_hash = ANY(%s)""",
            (fingerprint, list(texts)),
        )
    }
    missing = {h: v for h, v in texts.items() if h not in cached}
    unknown = [h for h, (_, n) in missing.items() if n is None]
    counted = dict(zip(unknown, count_tokens_batch([missing[h][0] for h in unknown]), strict=True))
    tokens = sum(n if n is not None else counted[h] for h, (_, n) in missing.items())
    prefix = InputStyle.from_settings(settings).passage_prefix
    if prefix and missing:  # an asymmetric model's passage prefix is sent (and billed) with every text
        tokens += len(missing) * count_tokens_batch([prefix])[0]
    probe = make_embedder(replace(settings, embedding_api_key=settings.embedding_api_key or "unused-by-plan"))
    try:  # (constructing an embedder opens no connection: only its provider and model name are read)
        price = lookup_price(
            probe.provider, probe.model, settings.embedding_price_per_mtok, dict(settings.embedding_prices)
        )
    finally:
        probe.close()
    n_docs = conn.execute("SELECT count(*) FROM document_bodies").fetchone()[0]
    return SwitchPlan(
        embedder=fingerprint,
        chunker=chunker.version,
        live_embedder=live_fp,
        live_chunker=live_cv,
        new_generation=(live_fp, live_cv) != (fingerprint, chunker.version),
        rechunk=rechunk,
        documents=int(n_docs),
        chunks=n_chunks,
        texts_to_embed=len(missing),
        tokens_to_embed=int(tokens),
        texts_cached=len(texts) - len(missing),
        price_per_mtok=price.per_mtok,
        price_known=price.known,
        cost_usd=round(tokens * price.per_mtok / 1e6, 6),
    )
