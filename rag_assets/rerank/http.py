"""A reranker behind ``POST {base}/rerank`` (Cohere, Jina, Voyage, vLLM, Infinity, LiteLLM, TEI).

One request per query, synchronous (httpx), thread-safe (one shared client). The policies, chosen
for a step that sits on every query's path:

Timeouts and retries
    Each request waits at most ``timeout_s``. 408, 429, 500, 502, 503, 504 and 529 answers,
    timeouts and connection errors are retried with exponential backoff and full jitter; a
    ``Retry-After`` (seconds or HTTP date) or ``retry-after-ms`` header sets the floor of the wait.
    All retries of one query stop once ``max_retry_s`` have passed since its first attempt, and a
    ``Retry-After`` beyond that fails at once instead of sleeping in vain: a question is answered
    (or given up on) within ``max_retry_s`` plus one timeout. The defaults (10 s and 5 s) are short
    because someone is waiting. A 2xx body that is not JSON is retried at most
    ``max_malformed_retries`` times; other 4xx answers and well-formed answers with wrong indices
    fail at once.
Errors
    :class:`RerankError` naming the endpoint (no userinfo, no query string), the model, the HTTP
    status and the provider's message; the API key is only ever in the ``Authorization`` header and
    is scrubbed from every message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import httpx

from rag_assets.embedders.openai_protocol import RETRYABLE_STATUS, provider_message
from rag_assets.embedders.rate_limit import Backoff, parse_retry_after
from rag_assets.rerank.base import Reranker, RerankError, Scored
from rag_assets.rerank.protocol import APIS, MalformedRerank, parse_response, request_body


def rerank_endpoint(base_url: str) -> tuple[str, str]:
    """``(url to POST, url to show)`` for a base URL: ``{base}/rerank``; the shown one has no
    userinfo and no query (either could hold a secret)."""
    url = httpx.URL(base_url.rstrip("/"))
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"RAG_RERANK_URL={base_url!r}: an http:// or https:// URL")
    path = url.path.rstrip("/")
    post = url.copy_with(path=f"{path}/rerank")
    port = f":{url.port}" if url.port else ""
    return str(post), f"{url.scheme}://{url.host}{port}{path}/rerank"


class HttpReranker(Reranker):
    """A rerank API; see the module docstring for its policies."""

    def __init__(
        self,
        base_url: str,
        model: str | None,
        api_key: str | None = None,
        *,
        api: str = "cohere",
        timeout_s: float = 10.0,
        max_retry_s: float = 5.0,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 5.0,
        max_malformed_retries: int = 1,
        seed: int | None = None,
    ):
        if api not in APIS:
            raise ValueError(f"RAG_RERANK_API={api!r}: use one of {', '.join(APIS)}")
        if api != "tei" and not model:
            raise ValueError(f"RAG_RERANK_API={api} needs RAG_RERANK_MODEL")
        if timeout_s <= 0 or max_retry_s < 0:
            raise ValueError("timeout_s must be > 0 and max_retry_s >= 0")
        self.url, self.endpoint = rerank_endpoint(base_url)
        self.model = model
        self.api = api
        self.timeout_s = float(timeout_s)
        self.max_retry_s = float(max_retry_s)
        self.max_malformed_retries = max_malformed_retries
        self._api_key = api_key or None
        self._backoff = Backoff(backoff_base_s, backoff_max_s, seed)
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self.name = f"http:{model or api}@{httpx.URL(self.endpoint).host}"

    @classmethod
    def from_settings(cls, settings, **overrides) -> HttpReranker:
        kwargs: dict[str, object] = {
            "base_url": settings.rerank_url,
            "model": settings.rerank_model,
            "api_key": settings.rerank_api_key,
            "api": settings.rerank_api,
            "timeout_s": settings.rerank_timeout_s,
            "max_retry_s": settings.rerank_max_retry_s,
        }
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"HttpReranker(endpoint={self.endpoint!r}, model={self.model!r}, api={self.api!r})"

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                headers = {"Content-Type": "application/json", "Accept": "application/json"}
                if self._api_key:
                    headers["Authorization"] = f"Bearer {self._api_key}"
                self._client = httpx.Client(
                    headers=headers,
                    timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 5.0)),
                    follow_redirects=False,
                )
            return self._client

    def _redact(self, text: str) -> str:
        if self._api_key and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "[REDACTED]")
        return text

    def rerank(self, query: str, documents: Sequence[str], top_n: int) -> list[Scored]:
        docs = list(documents)
        if not docs or top_n < 1:
            return []
        top_n = min(top_n, len(docs))
        body = request_body(self.api, self.model, query, docs, top_n)
        where = f"{self.endpoint} (model {self.model or 'the server default'})"
        client = self._http()
        first = time.monotonic()
        deadline = first + self.max_retry_s
        attempt = malformed = 0
        while True:
            retry_after: float | None = None
            status: int | None = None
            try:
                resp = client.post(self.url, content=body)
            except httpx.UnsupportedProtocol as exc:
                raise RerankError(f"rerank request to {where}: {exc}") from None
            except httpx.TimeoutException as exc:
                problem = f"no answer within {self.timeout_s:g}s ({type(exc).__name__}; RAG_RERANK_TIMEOUT_S)"
            except httpx.TransportError as exc:
                problem = f"connection error ({type(exc).__name__}: {self._redact(str(exc)) or 'no detail'})"
            else:
                status = resp.status_code
                if 200 <= status < 300:
                    try:
                        return parse_response(self.api, resp.content, len(docs), top_n, where)
                    except MalformedRerank as exc:
                        malformed += 1
                        if malformed > self.max_malformed_retries:
                            raise RerankError(f"{exc} (after {malformed} malformed answers)", status=status) from None
                        problem = str(exc)
                elif status in RETRYABLE_STATUS:
                    retry_after = parse_retry_after(resp.headers)
                    problem = f"HTTP {status}: {self._redact(provider_message(resp.content))}"
                else:
                    raise RerankError(
                        f"rerank request to {where} failed with HTTP {status}: "
                        f"{self._redact(provider_message(resp.content))}",
                        status=status,
                    )
            attempt += 1
            now = time.monotonic()
            remaining = deadline - now
            if retry_after is not None and retry_after > remaining:
                raise RerankError(
                    f"rerank request to {where}: {problem}; the server asks to retry after {retry_after:.1f}s, "
                    f"beyond the retry budget of {self.max_retry_s:g}s (RAG_RERANK_MAX_RETRY_S)",
                    status=status,
                )
            if remaining <= 0:
                raise RerankError(
                    f"rerank request to {where} failed after {attempt} attempts over {now - first:.1f}s "
                    f"(retry budget {self.max_retry_s:g}s, RAG_RERANK_MAX_RETRY_S): {problem}",
                    status=status,
                )
            delay = self._backoff.delay(attempt)
            if retry_after is not None:
                delay = max(delay, retry_after)
            time.sleep(min(delay, remaining))

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
