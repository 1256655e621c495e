"""The quality gate: a new generation goes live only if it answers the index's questions as well.

A model or chunker change builds a new generation while the old one serves. Before the switch,
the index's configured question set (``RAG_QUALITY_QUESTIONS``, JSONL as ``rag-assets eval``
reads it) is run on the new generation by exact distance (no HNSW approximation, so two builds of
one corpus score the same), and compared with the live generation's recall@k, recorded when it
went live (a generation built with another embedder cannot be re-queried with the new settings).
The switch is refused when recall@k dropped by more than ``RAG_QUALITY_TOLERANCE``: the old
generation keeps serving, the decision (both figures and why) is recorded and shown, and it is not
re-evaluated until the question set, the tolerance, k, or the generations change. Ordinary
incremental refreshes never pass through here: only switches to a new generation do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from rag_assets.settings import Settings
from rag_assets.store.generations import Generation, live_generation


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    generation: int
    live_generation: int | None = None
    k: int = 5
    recall_new: float | None = None
    recall_live: float | None = None
    tolerance: float = 0.0
    key: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _key(settings: Settings, gen: Generation, live: Generation | None) -> str:
    path = Path(settings.quality_questions or "")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "none"
    return f"{gen.id}:{live.id if live else '-'}:{digest}:{settings.quality_k}:{settings.quality_tolerance}"


def recorded_recall(conn: psycopg.Connection, gen_id: int) -> float | None:
    row = conn.execute("SELECT value FROM settings WHERE key = %s", (f"quality_recall:{gen_id}",)).fetchone()
    return float(row[0]["recall"]) if row else None


def record_recall(conn: psycopg.Connection, gen_id: int, recall: float, k: int, questions: str) -> None:
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (f"quality_recall:{gen_id}", Jsonb({"recall": recall, "k": k, "questions": questions})),
    )


def refusal(conn: psycopg.Connection, gen_id: int) -> dict | None:
    """The recorded refusal of generation ``gen_id``, if its switch was refused."""
    row = conn.execute("SELECT value FROM settings WHERE key = %s", (f"quality_refused:{gen_id}",)).fetchone()
    return row[0] if row else None


def measure(settings: Settings, gen_id: int) -> float:
    """recall@k of generation ``gen_id`` on the configured question set, in the mode the index serves
    (``RAG_RETRIEVAL_MODE``), vectors by exact distance."""
    from rag_assets.eval.questions import load_questions
    from rag_assets.eval.run import evaluate

    questions = load_questions(settings.quality_questions)
    return evaluate(settings, questions, k=settings.quality_k, generation=gen_id, exact=True).docs.recall


def judge(settings: Settings, conn: psycopg.Connection, gen: Generation) -> GateDecision:
    """Whether the complete building generation ``gen`` may replace the live one."""
    live = live_generation(conn)
    base = dict(generation=gen.id, live_generation=live.id if live else None, k=settings.quality_k,
                tolerance=settings.quality_tolerance)
    if not settings.quality_questions:
        return GateDecision(True, "no question set configured (RAG_QUALITY_QUESTIONS)", **base)
    key = _key(settings, gen, live)
    old = refusal(conn, gen.id)
    if old is not None and old.get("key") == key:
        return GateDecision(**{**old, "passed": False})  # already judged on these inputs
    recall_new = measure(settings, gen.id)
    if live is None:
        return GateDecision(True, "first generation: nothing to compare with", recall_new=recall_new, key=key, **base)
    recall_live = recorded_recall(conn, live.id)
    if recall_live is None and live.embedder_id == gen.embedder_id:
        recall_live = measure(settings, live.id)  # same embedder: the live one can be queried now
    if recall_live is None:
        return GateDecision(
            True,
            f"no recorded recall for live generation {live.id} (built with another embedder before the "
            "gate was configured): switching without a comparison",
            recall_new=recall_new,
            key=key,
            **base,
        )
    passed = recall_new >= recall_live - settings.quality_tolerance
    reason = (
        f"recall@{settings.quality_k} {recall_new:.3f} (generation {gen.id}) vs {recall_live:.3f} (live "
        f"generation {live.id}); tolerance {settings.quality_tolerance:g}"
    )
    return GateDecision(passed, reason, recall_new=recall_new, recall_live=recall_live, key=key, **base)


def record_decision(conn: psycopg.Connection, d: GateDecision, questions: str | None) -> None:
    """A refusal is kept (and shown) until it is lifted; a pass records the new baseline."""
    if d.passed:
        conn.execute("DELETE FROM settings WHERE key = %s", (f"quality_refused:{d.generation}",))
        if d.recall_new is not None:
            record_recall(conn, d.generation, d.recall_new, d.k, questions or "")
    else:
        conn.execute(
            "INSERT INTO settings (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (f"quality_refused:{d.generation}", Jsonb(json.loads(json.dumps(d.as_dict())))),
        )
