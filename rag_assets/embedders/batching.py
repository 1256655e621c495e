"""Packing the texts of one call into requests: in order, bounded by inputs and by tokens.

Inputs are packed in order into requests bounded by ``batch_size`` inputs *and* ``batch_tokens``
tokens. Batches are formed lazily, so the first requests go out while later texts are still being
tokenised, and the tokenizer only runs where a count matters: batches whose UTF-8 byte bound could
exceed ``batch_tokens``, and every batch when a tokens-per-minute budget is set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass
class Batch:
    """Consecutive pieces sent as one request."""

    start: int  # first piece index
    texts: list[str]
    tokens: int | None  # None: not counted (no TPM budget, and the batch budget cannot bind)
    labels: list[str] = field(default_factory=list)  # one per text: names it in errors
    counts: list[int] = field(default_factory=list)  # per text: tokens, or a byte bound when not exact

    def label(self, k: int) -> str:
        return self.labels[k] if k < len(self.labels) else f"text #{self.start + k}"

    def describe(self) -> str:
        """What the batch holds, for errors: the text's label, or the first and last labels."""
        n = len(self.texts)
        if n == 1:
            return self.label(0)
        return f"{n} inputs ({self.label(0)} .. {self.label(n - 1)})"

    def parts(self, size: int) -> list[Batch]:
        """The batch cut in order into batches of at most ``size`` texts."""
        if size >= len(self.texts):
            return [self]
        out = []
        for k in range(0, len(self.texts), size):
            counts = self.counts[k : k + size]
            out.append(
                Batch(
                    self.start + k,
                    self.texts[k : k + size],
                    sum(counts) if self.tokens is not None and counts else None,
                    self.labels[k : k + size],
                    counts,
                )
            )
        return out


def pack_batches(
    pieces: list[str],
    tokens: list[int | None],
    labels: Sequence[str] | None,
    *,
    batch_size: int,
    batch_tokens: int,
    size_now: Callable[[], int],
    count_tokens: Callable[[Sequence[str]], list[int]],
    must_count: Callable[[], bool],
) -> Iterator[Batch]:
    """Pack pieces in order into batches of <= ``batch_size`` inputs (or ``size_now()``, the learned
    limit, read afresh for each window) and <= ``batch_tokens`` tokens.

    A generator, so the first batches are on the wire while later ones are being formed.
    Pieces not counted yet are counted one window at a time, and only when the count matters:
    when a tokens-per-minute budget is set (``must_count()``, read for each window), or when the
    UTF-8 byte length (an upper bound on BPE tokens) of a full batch could exceed ``batch_tokens``.
    Otherwise the batch's tokens stay unknown (None) and the provider's ``usage`` is what gets
    recorded.
    """
    window = max(batch_size, 32)
    size = size_now()
    cur: list[str] = []
    cur_counts: list[int] = []
    cur_tokens = 0
    cur_exact = True
    cur_max_bound = 0
    start = 0

    def batch() -> Batch:
        lab = list(labels[start : start + len(cur)]) if labels is not None else []
        return Batch(start, cur, cur_tokens if cur_exact else None, lab, cur_counts)

    for w0 in range(0, len(pieces), window):
        size = min(size, size_now())
        w_texts = pieces[w0 : w0 + window]
        w_tokens = tokens[w0 : w0 + window]
        missing = [k for k, n in enumerate(w_tokens) if n is None]
        exact = True
        if missing:
            bounds = [len(w_texts[k].encode("utf-8")) for k in missing]
            max_bound = max(max(bounds), cur_max_bound)
            if must_count() or max_bound * size > batch_tokens:
                for k, n in zip(missing, count_tokens([w_texts[k] for k in missing]), strict=True):
                    w_tokens[k] = n
            else:  # the token budget cannot bind: skip tokenising
                exact = False
                cur_max_bound = max_bound
                for k, b in zip(missing, bounds, strict=True):
                    w_tokens[k] = b
        for k, (text, n) in enumerate(zip(w_texts, w_tokens, strict=True)):
            assert n is not None
            if cur and (len(cur) >= size or cur_tokens + n > batch_tokens):
                yield batch()
                cur, cur_counts, cur_tokens, cur_exact, start = [], [], 0, True, w0 + k
            cur.append(text)
            cur_counts.append(n)
            cur_tokens += n
            cur_exact = cur_exact and (exact or tokens[w0 + k] is not None)
    if cur:
        yield batch()
