"""The OpenAI ``POST /embeddings`` wire protocol: endpoints, request bodies, answers and error answers.

Pure functions, no connections: what to send (:func:`request_body`), how to read a 2xx answer
(:func:`parse_embeddings_response`, which validates everything a gateway or self-hosted server can
get wrong), and how to classify an error answer (:data:`RETRYABLE_STATUS`, :func:`provider_message`,
:func:`batch_too_large`). The client in :mod:`rag_assets.embedders.openai_compat` composes them.

Retried answers: 429, 408, 500, 502, 503, 504 and 529. A 2xx body that is not valid JSON (a
truncated or garbled answer from a flaky proxy) raises :class:`MalformedResponse`, which the client
retries a bounded number of times; a well-formed answer with the wrong number of vectors, ragged or
non-numeric vectors fails at once (retrying a deterministic model would only bill again). Other 4xx
answers fail at once with the HTTP status and the provider's ``error.message``, except a refusal of
a batch for its size, which :func:`batch_too_large` recognises so the batch is split instead.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx
import numpy as np

from rag_assets.embedders.base import EmbeddingDimensionError, EmbeddingError

DEFAULT_MODEL = "text-embedding-3-small"

# Native output sizes of known models (the ``dimensions`` option can shrink the 3-series).
KNOWN_DIMS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})
ENCODING_FORMATS = ("float", "base64")


def base_model(model: str) -> str:
    """``openai/text-embedding-3-small`` (a gateway's name) -> ``text-embedding-3-small``."""
    return model[len("openai/") :] if model.startswith("openai/") else model


def native_dims(model: str) -> int | None:
    """The native vector size of a known model; None when we do not know the model."""
    return KNOWN_DIMS.get(base_model(model))


def check_dimensions(model: str, dimensions: int | None) -> None:
    """Reject a ``dimensions`` option no server would honour (raises ``ValueError``)."""
    if not model:
        raise ValueError("model is required")
    if dimensions is None:
        return
    if dimensions < 1:
        raise ValueError("dimensions must be >= 1")
    native = native_dims(model)
    if native is not None and dimensions > native:
        raise ValueError(f"dimensions={dimensions} exceeds the {native} dimensions of {model}")


@dataclass(frozen=True)
class Endpoint:
    """Where embeddings are requested, and how that place is named in errors and logs."""

    base_url: str  # without a trailing slash
    url: str  # base_url + "/embeddings"
    host: str  # no userinfo, no path: safe to show
    display: str  # scheme://host:port/path/embeddings: no userinfo, no query (either could hold a secret)


def parse_endpoint(base_url: str) -> Endpoint:
    """Validate ``base_url`` (an http(s) URL with a host) and derive the request URL and its safe name."""
    if not base_url:
        raise ValueError("base_url is required")
    base = base_url.rstrip("/")
    url = httpx.URL(base)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("base_url must be an http(s) URL with a host")
    host = f"[{url.host}]" if ":" in url.host else url.host
    port = f":{url.port}" if url.port else ""
    return Endpoint(
        base_url=base,
        url=f"{base}/embeddings",
        host=url.host,
        display=f"{url.scheme}://{host}{port}{url.path.rstrip('/')}/embeddings",
    )


def request_body(
    model: str,
    texts: Sequence[str],
    encoding_format: str,
    dimensions: int | None,
    extra: Mapping[str, object] | None = None,
) -> bytes:
    """The JSON body of one embeddings request (``dimensions`` only when set; ``extra``: an
    asymmetric model's input type field, e.g. ``{"input_type": "search_query"}``)."""
    payload: dict[str, object] = {"model": model, "input": list(texts), "encoding_format": encoding_format}
    if dimensions:
        payload["dimensions"] = dimensions
    if extra:
        payload.update(extra)
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


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


class MalformedResponse(EmbeddingError):
    """A 2xx answer that is not JSON (truncated or garbled): retried a bounded number of times."""


def parse_embeddings_response(content: bytes, n: int, where: str) -> tuple[np.ndarray, int | None]:
    """Validate an embeddings answer for ``n`` inputs; return ``(float64 (n, d) in input order, usage tokens)``.

    Orders rows by ``index`` when the provider gives it. Raises ``EmbeddingError`` (or
    ``EmbeddingDimensionError`` for ragged vectors) on anything unexpected.
    """
    try:
        obj = json.loads(content)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedResponse(
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
