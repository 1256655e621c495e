"""The batch size an endpoint is known to take, learned from its answers and shared per endpoint.

Servers differ in how many inputs one request may carry (HuggingFace TEI refuses more than its
``--max-client-batch-size``, 32 by default; a small CPU model server takes every batch but cannot
answer a large one within the request timeout). When a batch is refused for its size (see
:func:`rag_assets.embedders.openai_protocol.batch_too_large`) or times out, the client lowers the
:class:`BatchSizeLimit` of that ``(base_url, model)``. The limit is process-wide, so later batches,
and later runs in the same process, start at the size that works instead of timing out again; it
only ever goes down.
"""

from __future__ import annotations

import threading


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
