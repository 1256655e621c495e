"""Texts longer than the model reads: the ``RAG_EMBEDDING_LONG_TEXT`` policy (``error`` or ``split``).

A text longer than ``max_input_tokens`` is never silently truncated. With ``long_text="error"`` the
call raises :class:`TextTooLongError` naming the text's label and token count before any request is
sent. With ``long_text="split"`` the text is cut at the coarsest natural boundary that fits
(paragraph, line, sentence, clause, word; characters as a last resort), each piece is embedded, and
the text's vector is the token-weighted mean of the (unit) piece vectors, re-normalised to unit
length. Weighting by tokens makes the result independent of where the cut falls as far as possible:
a 7,000-token piece counts seven times as much as a 1,000-token tail.

Pure functions, shared by every provider that has an input limit (the OpenAI-compatible client and
the local model): :func:`plan_inputs` turns texts into the pieces to send, :func:`assemble` turns the
pieces' vectors back into one unit vector per text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rag_assets.embedders.base import EmbeddingError, TextTooLongError

LONG_TEXT_POLICIES = ("error", "split")

_SEPARATORS = ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ")


def _split_keep(text: str, sep: str) -> list[str]:
    parts = text.split(sep)
    out = [p + sep for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return [p for p in out if p]


def _hard_split(text: str, limit: int, count: Callable[[str], int]) -> list[str]:
    """Cut ``text`` by characters into the longest prefixes that fit (binary search)."""
    pieces: list[str] = []
    rest = text
    while rest:
        if count(rest) <= limit:
            pieces.append(rest)
            break
        lo, hi = 1, len(rest)  # lo always fits (one character is a few tokens at most)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(rest[:mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        pieces.append(rest[:lo])
        rest = rest[lo:]
    return pieces


def split_text(text: str, limit: int, count: Callable[[str], int]) -> list[str]:
    """Split ``text`` into consecutive pieces, each with ``count(piece) <= limit``.

    Cuts at the coarsest boundary that works (paragraph, line, sentence, clause, word) and only
    falls back to characters for unbroken runs. The pieces concatenate back to ``text``, except
    that whitespace-only pieces are dropped.
    """
    if limit < 1:
        raise ValueError("limit must be >= 1")
    pieces = _split_level(text, limit, count, 0)
    kept = [p for p in pieces if p.strip()]
    return kept or pieces[:1]


def _split_level(text: str, limit: int, count: Callable[[str], int], level: int) -> list[str]:
    if count(text) <= limit:
        return [text]
    parts: list[str] = []
    while level < len(_SEPARATORS):
        parts = _split_keep(text, _SEPARATORS[level])
        if len(parts) > 1:
            break
        level += 1
    else:
        return _hard_split(text, limit, count)
    # Greedy packing with additive counts (BPE counts of a concatenation are ~ the sum), then a
    # check of each packed piece; a piece that still does not fit is split at the next level down.
    out: list[str] = []
    cur: list[str] = []
    cur_tokens = 0
    for part in parts:
        n = count(part)
        if n > limit:
            if cur:
                out.append("".join(cur))
                cur, cur_tokens = [], 0
            out.extend(_split_level(part, limit, count, level + 1))
            continue
        if cur and cur_tokens + n > limit:
            out.append("".join(cur))
            cur, cur_tokens = [], 0
        cur.append(part)
        cur_tokens += n
    if cur:
        out.append("".join(cur))
    checked: list[str] = []
    for piece in out:
        if count(piece) <= limit:
            checked.append(piece)
        else:
            checked.extend(_split_level(piece, limit, count, level + 1))
    return checked


def combine_pieces(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Token-weighted mean of piece vectors (each L2-normalised first), re-normalised to unit length."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise EmbeddingError("cannot combine pieces: a piece embedded to the zero vector")
    w = np.asarray(weights, dtype=np.float64)
    mean = ((v / norms) * w[:, None]).sum(axis=0) / w.sum()
    norm = np.linalg.norm(mean)
    if norm == 0:
        raise EmbeddingError("cannot combine pieces: their weighted mean is the zero vector")
    return (mean / norm).astype(np.float32)


@dataclass
class InputPlan:
    """What to send for ``n`` texts: ``pieces[k]`` with ``piece_tokens[k]`` belongs to text ``owners[k]``."""

    pieces: list[str]
    piece_tokens: list[int | None]  # None: fits, not counted yet (only unsplit texts)
    owners: list[int]
    n_texts: int

    @property
    def was_split(self) -> bool:
        return len(self.pieces) != self.n_texts


def label_of(labels: Sequence[str] | None, i: int) -> str:
    return labels[i] if labels is not None else f"text #{i}"


def plan_inputs(
    texts: Sequence[str],
    counts: Sequence[int | None],
    labels: Sequence[str] | None,
    *,
    max_input_tokens: int | None,
    long_text: str,
    count_one: Callable[[str], int],
    model: str,
    prefix: str = "",
) -> InputPlan:
    """Check every text against the input limit and apply the long-text policy (see module docs).

    A count of None means "known to fit, not counted yet" (the piece's count stays None).
    ``prefix`` (an asymmetric model's ``query: `` or ``passage: ``, :mod:`rag_assets.embedders.asymmetric`)
    is sent before every piece: ``counts`` and ``count_one`` count what is sent (prefix included),
    and a split text is cut so that each piece fits *with* its prefix.
    Raises :class:`TextTooLongError` for the first over-long text when the policy is "error", and
    :class:`EmbeddingError` for an empty text (providers reject them), both before any request.
    """
    pieces: list[str] = []
    piece_tokens: list[int | None] = []
    owners: list[int] = []
    too_long = [
        i for i, c in enumerate(counts) if max_input_tokens and c is not None and c > max_input_tokens
    ]
    if too_long and long_text != "split":
        i = too_long[0]
        more = f" ({len(too_long) - 1} more texts are too long as well)" if len(too_long) > 1 else ""
        raise TextTooLongError(
            f"{label_of(labels, i)}: {counts[i]} tokens exceeds the input limit of {max_input_tokens} "
            f"tokens of model {model}{more}; lower the chunk size or set RAG_EMBEDDING_LONG_TEXT=split",
            label=label_of(labels, i),
        )
    too_long_set = set(too_long)
    if too_long and prefix:
        assert max_input_tokens is not None
        if count_one(prefix) >= max_input_tokens:
            raise EmbeddingError(
                f"the prefix {prefix[:40]!r} alone takes {count_one(prefix)} of the {max_input_tokens} input "
                f"tokens of model {model}: no text fits after it"
            )
    for i, (text, c) in enumerate(zip(texts, counts, strict=True)):
        if not text:
            raise EmbeddingError(
                f"{label_of(labels, i)}: cannot embed an empty text", label=label_of(labels, i)
            )
        if i in too_long_set:
            assert max_input_tokens is not None
            fits = (lambda s: count_one(prefix + s)) if prefix else count_one
            for piece in split_text(text, max_input_tokens, fits):
                pieces.append(prefix + piece)
                piece_tokens.append(count_one(prefix + piece))
                owners.append(i)
        else:
            pieces.append(prefix + text)
            piece_tokens.append(None if c is None else int(c))
            owners.append(i)
    return InputPlan(pieces, piece_tokens, owners, len(texts))


def assemble(plan: InputPlan, vectors: np.ndarray) -> np.ndarray:
    """Rows per text from rows per piece: normalise, and combine the pieces of split texts."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise EmbeddingError("the provider returned a zero vector")
    v = v / norms
    if not plan.was_split:
        return v.astype(np.float32)
    out = np.zeros((plan.n_texts, v.shape[1]), dtype=np.float32)
    by_owner: dict[int, list[int]] = {}
    for k, owner in enumerate(plan.owners):
        by_owner.setdefault(owner, []).append(k)
    for owner, ks in by_owner.items():
        if len(ks) == 1:
            out[owner] = v[ks[0]]
        else:
            out[owner] = combine_pieces(v[ks], [plan.piece_tokens[k] or 1 for k in ks])
    return out

