"""Retrieval quality: labelled question sets, ranking metrics, and a runner over the query path.

``rag-assets eval QUESTIONS.jsonl`` reads a question set (:mod:`.questions`), runs every question
through :mod:`rag_assets.query` against the live generation or a named one (:mod:`.run`), and scores
the ranking by relevant document, and by chunk where the set labels chunks (:mod:`.metrics`).
"""

from rag_assets.eval.metrics import dedupe, mrr_at_k, ndcg_at_k, recall_at_k
from rag_assets.eval.questions import ChunkLabel, Question, QuestionSetError, load_questions, missing_docs
from rag_assets.eval.run import EvalError, EvalReport, QuestionResult, Scores, evaluate

__all__ = [
    "ChunkLabel",
    "EvalError",
    "EvalReport",
    "Question",
    "QuestionResult",
    "QuestionSetError",
    "Scores",
    "dedupe",
    "evaluate",
    "load_questions",
    "missing_docs",
    "mrr_at_k",
    "ndcg_at_k",
    "recall_at_k",
]
