"""``rag-assets cost``: what embedding cost, and what re-embedding everything would have cost.

Read from the recorded runs (``runs``), not estimated: each refresh that did work recorded
the tokens it sent to the provider, the price in force, and the tokens of the whole corpus after
the refresh — what a pipeline that re-embeds everything on each refresh would have paid.
"""

from __future__ import annotations

from datetime import date

import psycopg

# Stages that embed: the core's one-shot refresh and the Dagster embeddings asset.
EMBED_STAGES = ("refresh", "embeddings")


def cost_report(
    conn: psycopg.Connection, since: date | None = None, price_per_mtok: float | None = None
) -> dict:
    """Spend per day and model; ``price_per_mtok`` re-prices every run (e.g. a what-if at 0.02 USD)."""
    rows = conn.execute(
        """SELECT (started_at AT TIME ZONE 'UTC')::date AS day, model, embedder, count(*) AS runs,
                  sum(tokens_embedded), sum(tokens_full_reembed),
                  sum(tokens_embedded * coalesce(%(p)s, price_per_mtok) / 1e6),
                  sum(tokens_full_reembed * coalesce(%(p)s, price_per_mtok) / 1e6)
           FROM runs
           WHERE stage = ANY(%(stages)s) AND (%(since)s::date IS NULL OR started_at >= %(since)s::date)
           GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
        {"p": price_per_mtok, "stages": list(EMBED_STAGES), "since": since},
    ).fetchall()
    out = []
    for day, model, embedder, runs, tok, full_tok, cost, full_cost in rows:
        tok, full_tok = int(tok or 0), int(full_tok or 0)
        cost, full_cost = float(cost or 0), float(full_cost or 0)
        out.append(
            {
                "day": day.isoformat(),
                "model": model,
                "embedder": embedder,
                "runs": runs,
                "tokens_embedded": tok,
                "cost_usd": round(cost, 6),
                "full_reembed_tokens": full_tok,
                "full_reembed_cost_usd": round(full_cost, 6),
                "saved_usd": round(full_cost - cost, 6),
                "saved_pct": round(100 * (1 - tok / full_tok), 2) if full_tok else None,
            }
        )
    total_tok = sum(r["tokens_embedded"] for r in out)
    total_full = sum(r["full_reembed_tokens"] for r in out)
    return {
        "price_per_mtok_override": price_per_mtok,
        "rows": out,
        "total": {
            "runs": sum(r["runs"] for r in out),
            "tokens_embedded": total_tok,
            "cost_usd": round(sum(r["cost_usd"] for r in out), 6),
            "full_reembed_tokens": total_full,
            "full_reembed_cost_usd": round(sum(r["full_reembed_cost_usd"] for r in out), 6),
            "saved_pct": round(100 * (1 - total_tok / total_full), 2) if total_full else None,
        },
    }
