"""Labelled question sets: one JSON object per line, read and checked before anything is queried.

A line is ``{"id", "question", "relevant_docs": [doc ids], "split": "dev"|"report"}`` with an optional
``"relevant_chunks": [{"doc_id", "text"}]``. Doc ids are the index's own (paths relative to the
indexed folder). A chunk label names a passage rather than a chunk number, because chunk numbers
change whenever the chunker does: a hit satisfies it when it comes from ``doc_id`` and its text
contains ``text`` (whitespace collapsed). The ``dev`` split may be looked at while developing; the
``report`` split is only reported, never tuned on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("dev", "report")


class QuestionSetError(ValueError):
    """The question set cannot be used as written; the message names the file and line."""


@dataclass(frozen=True)
class ChunkLabel:
    doc_id: str
    text: str

    def matches(self, doc_id: str, chunk_text: str) -> bool:
        return doc_id == self.doc_id and squash(self.text) in squash(chunk_text)


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    relevant_docs: tuple[str, ...]
    split: str
    relevant_chunks: tuple[ChunkLabel, ...] = ()


def squash(text: str) -> str:
    """Whitespace collapsed to single spaces: chunk boundaries and reflowing do not break a label."""
    return " ".join(text.split())


def _str_list(v: object, where: str, field: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise QuestionSetError(f"{where}: {field!r} must be a non-empty list of non-empty strings")
    return tuple(dict.fromkeys(v))


def parse_question(obj: object, where: str) -> Question:
    """One line's object → a :class:`Question`; ``where`` (file:line) names it in errors."""
    if not isinstance(obj, dict):
        raise QuestionSetError(f"{where}: expected a JSON object")
    unknown = set(obj) - {"id", "question", "relevant_docs", "split", "relevant_chunks"}
    if unknown:
        raise QuestionSetError(f"{where}: unknown field(s) {sorted(unknown)}")
    qid, text, split = obj.get("id"), obj.get("question"), obj.get("split")
    if not isinstance(qid, str) or not qid:
        raise QuestionSetError(f"{where}: 'id' must be a non-empty string")
    if not isinstance(text, str) or not text.strip():
        raise QuestionSetError(f"{where} ({qid}): 'question' must be a non-empty string")
    if split not in SPLITS:
        raise QuestionSetError(f"{where} ({qid}): 'split' must be one of {list(SPLITS)}, not {split!r}")
    docs = _str_list(obj.get("relevant_docs"), f"{where} ({qid})", "relevant_docs")
    chunks: list[ChunkLabel] = []
    for c in obj.get("relevant_chunks") or []:
        if not (
            isinstance(c, dict)
            and set(c) == {"doc_id", "text"}
            and all(isinstance(c[f], str) and squash(c[f]) for f in c)
        ):
            raise QuestionSetError(
                f'{where} ({qid}): each relevant_chunks entry must be {{"doc_id": str, "text": str}}'
            )
        if c["doc_id"] not in docs:
            raise QuestionSetError(
                f"{where} ({qid}): chunk label's doc {c['doc_id']!r} is not in relevant_docs"
            )
        chunks.append(ChunkLabel(c["doc_id"], c["text"]))
    return Question(qid, text, docs, split, tuple(chunks))


def load_questions(path: str | Path, split: str | None = None) -> list[Question]:
    """Every question of the JSONL file at ``path`` (ids unique), or only those of ``split``."""
    p = Path(path)
    if split is not None and split not in SPLITS:
        raise QuestionSetError(f"split {split!r}: must be one of {list(SPLITS)}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise QuestionSetError(f"cannot read question set {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise QuestionSetError(f"question set {p} is not UTF-8 text") from None
    out: list[Question] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuestionSetError(f"{where}: not JSON ({e.msg})") from None
        q = parse_question(obj, where)
        if q.id in seen:
            raise QuestionSetError(f"{where}: duplicate id {q.id!r}")
        seen.add(q.id)
        out.append(q)
    if not out:
        raise QuestionSetError(f"question set {p} holds no questions")
    return [q for q in out if split is None or q.split == split]


def missing_docs(questions: Iterable[Question], doc_ids: Iterable[str]) -> list[tuple[str, str]]:
    """``(question id, doc id)`` for every relevant document absent from ``doc_ids``: a label that
    can never be found would silently pull every score down."""
    have = set(doc_ids)
    return [(q.id, d) for q in questions for d in q.relevant_docs if d not in have]
