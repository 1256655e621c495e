"""Prometheus metrics of the service, on a registry of its own (one per app, so tests can build many).

Names::

    rag_webhook_events_accepted_total{type}        events committed to the inbox (new ids)
    rag_webhook_events_rejected_total{reason}      not stored: bad_signature, stale_timestamp, too_large,
                                                   bad_json, bad_event, bad_timestamp (the event's source
                                                   time), slow_body, duplicate, unavailable
    rag_inbox_pending                              unapplied inbox events (read at scrape time)
    rag_inbox_lag_seconds                          age of the oldest unapplied event (0 when none)
    rag_database_up                                1 if the scrape could read the database
    rag_query_latency_seconds                      POST /query handling time, successful queries
    rag_http_requests_total{route, method, status} every HTTP answer, by route template
    rag_http_request_duration_seconds{route}       every HTTP answer's duration
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

REJECT_REASONS = (
    "bad_signature",
    "stale_timestamp",
    "too_large",
    "bad_json",
    "bad_event",
    "bad_timestamp",
    "slow_body",
    "duplicate",
    "unavailable",
)
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class ServiceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.events_accepted = Counter(
            "rag_webhook_events_accepted", "Webhook events committed to the inbox", ["type"], registry=r
        )
        self.events_rejected = Counter(
            "rag_webhook_events_rejected", "Webhook requests not stored, by reason", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:  # export zeros so dashboards and alerts see every series
            self.events_rejected.labels(reason)
        self.inbox_pending = Gauge("rag_inbox_pending", "Unapplied webhook events in the inbox", registry=r)
        self.inbox_lag = Gauge(
            "rag_inbox_lag_seconds", "Age of the oldest unapplied inbox event (0 when none)", registry=r
        )
        self.database_up = Gauge(
            "rag_database_up", "1 if the last scrape could read the database", registry=r
        )
        self.query_latency = Histogram(
            "rag_query_latency_seconds", "POST /query handling time", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.rerank_fallbacks = Counter(
            "rag_rerank_fallbacks",
            "Queries answered in first-stage order because the reranker failed (RAG_RERANK_ON_ERROR=fallback)",
            registry=r,
        )
        self.http_requests = Counter(
            "rag_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "rag_http_request_duration_seconds",
            "HTTP request duration by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def reject(self, reason: str) -> None:
        self.events_rejected.labels(reason).inc()

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (body, content type), negotiated from the scraper's Accept header:
        Prometheus text format by default, OpenMetrics when asked for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
