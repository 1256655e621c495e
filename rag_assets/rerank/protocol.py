"""The rerank wire protocols: what to send to ``POST {base}/rerank`` and how to read the answer.

Three shapes cover the servers in use (pure functions, no connection):

``cohere``
    ``{"model", "query", "documents": [str], "top_n"}`` → ``{"results": [{"index", "relevance_score"}]}``.
    Cohere (``/v2/rerank``), Jina (``/v1/rerank``), vLLM, Infinity, LiteLLM and TEI's Cohere-style
    route all speak it.
``voyage``
    Voyage AI (``/v1/rerank``): ``top_k`` instead of ``top_n``, ``truncation: true``; the answer
    lists ``data`` instead of ``results``.
``tei``
    Hugging Face text-embeddings-inference's own ``/rerank``: ``{"query", "texts", "truncate": true}``
    → ``[{"index", "score"}]`` (every text scored; no model name, the server runs one).

Chunks longer than the model reads are truncated by the server (Cohere and Voyage do so by default;
TEI is asked to), never refused. An answer that is not JSON (a cut or garbled body) raises
:class:`MalformedRerank`, which the client retries a bounded number of times; a JSON answer with
missing, repeated or out-of-range indices, or with scores that are not finite numbers, raises
:class:`RerankError` at once (a deterministic model would answer the same again).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from rag_assets.rerank.base import RerankError, Scored, best_first

APIS = ("cohere", "voyage", "tei")


class MalformedRerank(RerankError):
    """A 2xx answer whose body is not JSON: retried a bounded number of times."""


def request_body(api: str, model: str | None, query: str, documents: Sequence[str], top_n: int) -> bytes:
    if api == "tei":
        payload: dict[str, object] = {"query": query, "texts": list(documents), "truncate": True}
    elif api == "voyage":
        payload = {"model": model, "query": query, "documents": list(documents), "top_k": top_n, "truncation": True}
    elif api == "cohere":
        payload = {"model": model, "query": query, "documents": list(documents), "top_n": top_n}
    else:
        raise ValueError(f"rerank api {api!r}: use one of {', '.join(APIS)}")
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def parse_response(api: str, content: bytes, n: int, top_n: int, where: str) -> list[Scored]:
    """The scored candidates of an answer for ``n`` documents: the best ``min(top_n, n)``, best first."""
    try:
        obj = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise MalformedRerank(f"rerank answer from {where} is not JSON ({len(content)} bytes)") from None
    if api == "tei":
        items, key = obj, "score"
    else:
        items = obj.get("data" if api == "voyage" else "results") if isinstance(obj, dict) else None
        if items is None and isinstance(obj, dict):  # a server that names the list the other way
            items = obj.get("results", obj.get("data"))
        key = "relevance_score"
    if not isinstance(items, list):
        raise RerankError(f"rerank answer from {where}: no list of results in {str(obj)[:200]!r}")
    want = min(top_n, n)
    scores: dict[int, float] = {}
    for item in items:
        if not isinstance(item, dict):
            raise RerankError(f"rerank answer from {where}: a result is not an object: {str(item)[:100]!r}")
        index = item.get("index")
        score = item.get(key, item.get("score" if key == "relevance_score" else "relevance_score"))
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise RerankError(f"rerank answer from {where}: index {index!r} is not one of the {n} documents sent")
        if index in scores:
            raise RerankError(f"rerank answer from {where}: document {index} is scored twice")
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise RerankError(f"rerank answer from {where}: document {index} has no finite score ({score!r})")
        scores[index] = float(score)
    if len(scores) < want:
        raise RerankError(f"rerank answer from {where}: {len(scores)} results for {n} documents (asked for {want})")
    ranked = best_first([scores.get(i, -math.inf) for i in range(n)], want)
    return [s for s in ranked if s.index in scores]
