"""Optional: the service applies the webhook events it acknowledged itself, within about a second.

By default acknowledged events wait in the inbox for Dagster: the inbox sensor reports their shards and the
automation sensor launches the run, two daemon ticks (≥ 5 s each) plus a run start: 26–38 s with the default
intervals, 10–16 s with 1 s intervals (`benchmarks/freshness.py --source webhook`). With
``RAG_SERVICE_APPLY_INTERVAL_S`` > 0 a background thread of `rag-assets serve` runs the core refresh
(`Indexer.refresh`, the `rag-assets index --core` path) as soon as events are pending, at most once per
interval. Nothing else changes: the stages are level-triggered and take per-shard locks, so the refresh and
any Dagster run serialise per shard; a Dagster run that follows finds its shards in step and does nothing.
Refreshes made here are recorded in ``runs`` (stage ``refresh``), not in Dagster's run history.
"""

from __future__ import annotations

import logging
import threading
import time

from rag_assets.embedders.base import Embedder
from rag_assets.settings import Settings

log = logging.getLogger("rag_assets.service")


class InboxApplier:
    """A daemon thread: wakes on :meth:`notify` (or every ``interval_s``) and refreshes while events are pending."""

    def __init__(self, settings: Settings, embedder: Embedder, interval_s: float):
        self.settings = settings
        self.embedder = embedder
        self.interval_s = max(0.05, float(interval_s))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> InboxApplier:
        self._thread = threading.Thread(target=self._run, name="rag-inbox-applier", daemon=True)
        self._thread.start()
        return self

    def notify(self) -> None:
        """An event was committed to the inbox: apply it without waiting for the next interval."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        from rag_assets.pipeline import Indexer
        from rag_assets.store.inbox import pending_count

        idx: Indexer | None = None
        last = 0.0
        # After a failed refresh, retry until one succeeds even with no event pending: the failed one may
        # have consumed the events into the manifest before a later stage failed (the stages commit one by
        # one and are level-triggered, so the next refresh completes what is behind).
        retry = False
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            pause = last + self.interval_s - time.monotonic()
            if pause > 0:  # at most one refresh per interval: a burst of events shares one
                self._stop.wait(pause)
            try:
                if idx is None:
                    idx = Indexer(self.settings, embedder=self.embedder)
                if not retry and pending_count(idx.conn) == 0:
                    continue
                last = time.monotonic()
                rep = idx.refresh(progress=False)  # the folder the index is bound to, never RAG_SOURCE_PATH
                retry = False
                log.info(
                    "applied pending webhook events: %d shard(s), %d chunk(s) embedded in %.2f s",
                    rep.shards_refreshed,
                    rep.chunks_embedded,
                    rep.seconds,
                )
            except Exception as e:  # noqa: BLE001 - keep serving; retried after the interval
                retry = True
                log.warning(
                    "could not apply pending webhook events (retrying in %.1f s): %s", self.interval_s, e
                )
                if idx is not None:
                    idx.conn.close()
                    idx = None
                self._stop.wait(self.interval_s)
        if idx is not None:
            idx.conn.close()
