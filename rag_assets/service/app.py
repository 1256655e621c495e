"""The HTTP service: webhooks in (``POST /webhooks/documents``), queries out (``POST /query``).

One Starlette app, run by uvicorn (``rag_assets.service.server.serve``). Database work runs in the
thread pool on connections from a ``psycopg_pool.ConnectionPool``, so the event loop never waits on
Postgres; signatures and JSON are checked on the loop (microseconds). No connection is held across
network I/O: a query's text is embedded first (in threads of their own, so slow embedding calls
cannot starve health checks and webhooks of threads either), then a connection is taken for the
SQL. Pooled connections are checked on checkout, so after a database restart the first request
gets a fresh connection instead of a dead one.

Status codes
    ``POST /webhooks/documents``
        202 ``{"status": "accepted", "seq": N}``  new event, committed to ``inbox``
        200 ``{"status": "duplicate", "seq": N}`` event id already stored (nothing written)
        400 ``{"error": ...}``  malformed JSON, bad event (e.g. a doc_id that is not a canonical
                                relative path, a source ``timestamp`` before 1970 or more than
                                RAG_WEBHOOK_TOLERANCE_S ahead of our clock), bad Content-Length
        401 ``{"error": ...}``  missing/invalid signature, timestamp outside the tolerance
        408 ``{"error": ...}``  body not received within RAG_SERVICE_BODY_TIMEOUT_S
        413 ``{"error": ...}``  body larger than RAG_WEBHOOK_MAX_BODY (Content-Length, or counted)
        503 ``{"error": ...}``  database unavailable (nothing acknowledged: the sender retries)
    ``POST /query``
        200 ``{"results": [...], "generation": N}``
        400 invalid input;  401 missing/wrong API key (when RAG_QUERY_API_KEY is set; the
        ``Bearer`` scheme is case-insensitive);  408 body not received in time
        409 the index cannot answer this query (built by another embedder, vector size mismatch)
        413 body over 1 MiB
        503 the index is empty (nothing indexed yet; ``Retry-After``), or the database is unavailable
        502 the query embedder (a remote API) failed
    ``GET /healthz``  200 database reachable (``generation`` may be null before the first index);
                      503 otherwise
    ``GET /metrics``  Prometheus text format
    ``GET /openapi.json``
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rag_assets.embedders import Embedder, EmbeddingError, TextTooLongError, make_embedder
from rag_assets.query import MODES as QUERY_MODES
from rag_assets.query import (
    QueryError,
    QueryResult,
    candidate_depth,
    check_embedder_matches,
    embed_query,
    search_embedded,
)
from rag_assets.rerank import RerankError, make_reranker
from rag_assets.rerank.apply import rerank_result
from rag_assets.service import logsafe
from rag_assets.service.applier import InboxApplier
from rag_assets.service.events import (
    EventError,
    WebhookEvent,
    body_timestamp,
    check_json_value,
    check_text,
    parse_event,
    parse_json,
)
from rag_assets.service.metrics import ServiceMetrics
from rag_assets.service.signatures import (
    SecretError,
    SignatureError,
    check_tolerance,
    parse_secrets,
    verify_request,
)
from rag_assets.settings import Settings, SettingsError
from rag_assets.store import inbox
from rag_assets.store.db import connect, database_url
from rag_assets.store.inbox import InboxError
from rag_assets.store.serving import live_generation

log = logging.getLogger("rag_assets.service")

QUERY_MAX_BODY = 1024 * 1024
QUERY_MAX_TEXT = 10_000
QUERY_MAX_K = 100
FILTER_MAX_KEYS = 32
FILTER_MAX_LIST = 100
EMPTY_INDEX_RETRY_S = 30
EMBED_THREADS = 32  # query embeddings in flight at once (threads of their own, see the module docstring)
ROUTES = ("/webhooks/documents", "/query", "/healthz", "/metrics", "/openapi.json")


class TooLarge(Exception):
    pass


class SlowBody(Exception):
    pass


class BadRequest(Exception):
    def __init__(self, message: str, reason: str = "bad_event"):
        super().__init__(message)
        self.reason = reason


class EmptyIndex(Exception):
    pass


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _unavailable(e: BaseException) -> JSONResponse:
    return _error(503, f"database unavailable: {type(e).__name__}", {"Retry-After": "5"})


_DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, ConnectionError)


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The body, refusing more than ``limit`` bytes (by Content-Length first, then while reading)
    and, with ``timeout_s``, a body that has not fully arrived after that long (``SlowBody``)."""
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.strip().isdigit():
            raise BadRequest("invalid Content-Length", "bad_json")
        if int(cl) > limit:
            raise TooLarge
    chunks: list[bytes] = []
    n = 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    raise TooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise SlowBody from None
    return b"".join(chunks)


def _slow_body(settings: Settings) -> JSONResponse:
    return _error(
        408,
        f"request body not received within {settings.service_body_timeout_s:g} s (RAG_SERVICE_BODY_TIMEOUT_S)",
        {"Connection": "close"},
    )


def bearer_token(header: str | None) -> bytes | None:
    """The credentials of an ``Authorization: Bearer <token>`` header (the scheme is
    case-insensitive, RFC 7235 §2.1), or None."""
    if not header:
        return None
    scheme, sep, token = header.strip().partition(" ")
    token = token.strip()
    if not sep or scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token.encode("latin-1", "replace")  # the raw header bytes (ASGI decodes them as latin-1)


# --- query input ----------------------------------------------------------------------------


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _scalar_ok(v: object) -> bool:
    return v is None or isinstance(v, str | bool) or _is_number(v)


def parse_query(obj: dict) -> dict[str, Any]:
    """Validate a ``POST /query`` body → kwargs for ``search``. Raises BadRequest."""
    unknown = set(obj) - {"text", "k", "filter", "min_score", "mode", "rerank"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("text must be a non-empty string")
    if len(text) > QUERY_MAX_TEXT:
        raise BadRequest(f"text is longer than {QUERY_MAX_TEXT} characters")
    try:
        check_text(text, "text")
    except EventError as e:
        raise BadRequest(str(e)) from None
    k = obj.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= QUERY_MAX_K:
        raise BadRequest(f"k must be an integer between 1 and {QUERY_MAX_K}")
    filt = obj.get("filter")
    if filt is None:
        filt = {}
    if not isinstance(filt, dict):
        raise BadRequest("filter must be an object of metadata key → value (scalar or list of scalars)")
    if len(filt) > FILTER_MAX_KEYS:
        raise BadRequest(f"filter has more than {FILTER_MAX_KEYS} keys")
    for key, v in filt.items():
        if not key:
            raise BadRequest("filter keys must be non-empty")
        if isinstance(v, list):
            if len(v) > FILTER_MAX_LIST or not all(_scalar_ok(x) for x in v):
                raise BadRequest(f"filter {key!r}: a list must hold at most {FILTER_MAX_LIST} scalars")
        elif not _scalar_ok(v):
            raise BadRequest(
                f"filter {key!r}: value must be a string, number, boolean, null or list of those"
            )
        try:
            check_json_value({key: v}, "filter")
        except EventError as e:
            raise BadRequest(str(e)) from None
    min_score = obj.get("min_score")
    if min_score is not None and (not _is_number(min_score) or not -1.0 <= min_score <= 1.0):
        raise BadRequest("min_score must be a number between -1 and 1")
    mode = obj.get("mode")
    if mode is not None and mode not in QUERY_MODES:
        raise BadRequest(f"mode must be one of {', '.join(QUERY_MODES)}")
    rerank = obj.get("rerank")
    if rerank is not None and not isinstance(rerank, bool):
        raise BadRequest("rerank must be true or false (default: on when RAG_RERANK is set)")
    return {"text": text, "k": k, "filt": filt or None, "min_score": min_score, "mode": mode, "rerank": rerank}


# --- the app --------------------------------------------------------------------------------


class ServiceState:
    """What the handlers share: settings, keys, the embedder, the pool and the metrics."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        pool_min_size: int,
        pool_max_size: int,
        pool_timeout: float,
    ):
        self.settings = settings
        try:
            self.keys = parse_secrets(settings.webhook_secret)
        except SecretError as e:
            raise SettingsError(
                f"RAG_WEBHOOK_SECRET: {e}; the service refuses to start without a usable webhook signing "
                "secret (set one or more comma-separated secrets of at least 16 bytes, e.g. whsec_<base64>)"
            ) from None
        self.embedder = embedder
        self.metrics = ServiceMetrics()
        self.pool: ConnectionPool | None = None
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.pool_timeout = pool_timeout
        self.n_shards: int | None = None
        self.applier: InboxApplier | None = None  # RAG_SERVICE_APPLY_INTERVAL_S > 0
        api_key = settings.query_api_key
        self.query_key = api_key.encode("utf-8") if api_key else None  # as a client sends it
        self.embed_limiter = anyio.CapacityLimiter(EMBED_THREADS)
        self.reranker = make_reranker(settings)  # None: RAG_RERANK=off; connects at the first query

    def query_authorized(self, header: str | None) -> bool:
        if self.query_key is None:
            return True
        given = bearer_token(header)
        # constant time in the key's content (a missing token is compared too, and refused)
        return hmac.compare_digest(given if given is not None else b"", self.query_key)

    # Runs in a worker thread.
    def db(self, fn: Callable[[psycopg.Connection], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on a pooled connection that was checked on checkout (one round trip).

        A database restart breaks every pooled connection at once. The first broken one found here
        makes the pool test all its idle connections (``ConnectionPool.check``: the broken ones are
        replaced), and the request goes on with a working connection, so the first request after a
        restart succeeds instead of each dead connection costing one 503. ``fn`` itself runs once.
        """
        pool = self.pool
        if pool is None:
            raise ConnectionError("the service is not started")
        deadline = time.monotonic() + (self.pool_timeout if timeout is None else timeout)
        for _ in range(self.pool_max_size + 2):
            conn = pool.getconn(timeout=max(0.0, deadline - time.monotonic()))
            try:
                ConnectionPool.check_connection(conn)
            except (psycopg.Error, OSError):
                pool.putconn(conn)  # closed by the failed check: the pool discards and replaces it
                pool.check()
                continue
            try:
                with conn:
                    return fn(conn)
            finally:
                pool.putconn(conn)
        raise psycopg.OperationalError("no working database connection after checking the whole pool")

    def store_event(self, conn: psycopg.Connection, event: WebhookEvent) -> tuple[int, bool]:
        if self.n_shards is None:
            self.n_shards = inbox.shard_count(conn, self.settings.shards)
        return inbox.insert_event(conn, event, self.n_shards)


def _migrate(url: str, schema: str) -> None:
    conn = connect(url, schema=schema)  # creates/migrates the index's schema once
    conn.close()


def _configurer(schema: str) -> Callable[[psycopg.Connection], None]:
    """Pool connections read the service's index: its schema first on ``search_path``."""

    def configure(conn: psycopg.Connection) -> None:
        from pgvector.psycopg import register_vector

        from rag_assets.store.db import search_path_sql

        conn.execute(search_path_sql(conn, schema))
        conn.commit()
        register_vector(conn)

    return configure


def create_app(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    pool_min_size: int = 2,
    pool_max_size: int = 16,
    pool_timeout: float = 10.0,
) -> Starlette:
    """The ASGI app. Raises ``SettingsError`` without a webhook secret (checked here, not at startup).

    The database (``RAG_DATABASE_URL`` or the embedded server) is attached at startup (lifespan):
    the schema is migrated and the connection pool opened; a database that cannot be reached
    then fails the startup with a clear error. ``embedder`` defaults to ``make_embedder(settings)``
    (created once, here); ``pool_timeout`` is how long a request waits for a connection before
    answering 503.
    """
    state = ServiceState(
        settings, embedder or make_embedder(settings), pool_min_size, pool_max_size, pool_timeout
    )
    m = state.metrics
    logsafe.install("rag_assets.service", "uvicorn.error")

    @asynccontextmanager
    async def lifespan(app: Starlette):
        url = await run_in_threadpool(database_url, settings)
        await run_in_threadpool(_migrate, url, settings.pg_schema)
        pool = ConnectionPool(
            url,
            min_size=state.pool_min_size,
            max_size=state.pool_max_size,
            kwargs={"autocommit": True},
            configure=_configurer(settings.pg_schema),
            open=False,
            timeout=pool_timeout,
            name="rag-service",
        )
        await run_in_threadpool(lambda: pool.open(wait=True, timeout=30.0))
        state.pool = pool
        if settings.service_apply_interval_s > 0:
            state.applier = InboxApplier(settings, state.embedder, settings.service_apply_interval_s).start()
        log.info("rag-assets service ready (database pool %d-%d)", pool_min_size, pool_max_size)
        try:
            yield
        finally:
            if state.applier is not None:
                await run_in_threadpool(state.applier.stop)
                state.applier = None
            state.pool = None
            await run_in_threadpool(pool.close)
            if state.reranker is not None:
                state.reranker.close()

    async def webhook(request: Request) -> Response:
        try:
            body = await read_body(request, settings.webhook_max_body, settings.service_body_timeout_s)
        except TooLarge:
            m.reject("too_large")
            return _error(413, f"body larger than {settings.webhook_max_body} bytes (RAG_WEBHOOK_MAX_BODY)")
        except SlowBody:
            m.reject("slow_body")
            return _slow_body(settings)
        except BadRequest as e:
            m.reject(e.reason)
            return _error(400, str(e))
        except ClientDisconnect:
            return Response(status_code=400)
        headers = dict(request.headers.items())  # keys are lower-case
        try:
            verified = verify_request(
                state.keys,
                headers,
                body,
                signature_header=settings.webhook_signature_header,
                tolerance_s=settings.webhook_tolerance_s,
            )
        except SignatureError as e:
            m.reject(e.reason)
            return _error(401, str(e))
        try:
            obj = parse_json(body)
            event_id: object = verified.event_id
            if verified.style == "sha256":
                # Only the body is signed: its timestamp bounds the replay window, its id wins.
                ts = body_timestamp(obj)
                try:
                    check_tolerance(ts.timestamp(), settings.webhook_tolerance_s)
                except SignatureError as e:
                    m.reject(e.reason)
                    return _error(401, f"body timestamp: {e}")
                body_id = obj.get("id")
                if body_id is not None:
                    if verified.event_id and body_id != verified.event_id:
                        raise EventError("the webhook-id header does not match the body's id")
                    event_id = body_id
            event = parse_event(obj, event_id, max_future_s=settings.webhook_tolerance_s)
            if event.content is not None and len(event.content.encode("utf-8")) > settings.max_doc_bytes:
                raise EventError(
                    f"data.content is larger than {settings.max_doc_bytes} bytes (RAG_MAX_DOC_BYTES)"
                )
        except EventError as e:
            m.reject(e.reason)
            return _error(400, str(e))
        try:
            seq, duplicate = await run_in_threadpool(state.db, lambda conn: state.store_event(conn, event))
        except InboxError as e:  # pragma: no cover - parse_event checks the same rules first
            m.reject("bad_event")
            return _error(400, str(e))
        except _DB_ERRORS as e:
            log.warning("webhook %s not stored: %s", event.event_id, e)
            m.reject("unavailable")
            return _unavailable(e)
        if duplicate:
            m.reject("duplicate")
            return JSONResponse({"status": "duplicate", "seq": seq}, status_code=200)
        m.events_accepted.labels(event.type).inc()
        if state.applier is not None:
            state.applier.notify()
        return JSONResponse({"status": "accepted", "seq": seq}, status_code=202)

    def _empty_index(e: QueryError) -> Exception:
        return EmptyIndex(str(e)) if "index is empty" in str(e) else e

    def _precheck(conn: psycopg.Connection) -> None:
        """Before paying for an embedding: is there an index, built by our embedder?"""
        try:
            check_embedder_matches(conn, state.embedder)
        except QueryError as e:
            raise _empty_index(e) from None

    def _search(conn: psycopg.Connection, vector: Any, q: dict[str, Any], depth: int) -> QueryResult:
        try:
            return search_embedded(
                conn,
                state.embedder,
                vector,
                depth,
                q["filt"],
                q["min_score"],
                mode=q["mode"] or settings.retrieval_mode,
                text=q["text"],
                rrf_k=settings.rrf_k,
                ef_search=settings.hnsw_ef_search,
            )
        except QueryError as e:
            raise _empty_index(e) from None

    async def query(request: Request) -> Response:
        if not state.query_authorized(request.headers.get("authorization")):
            return _error(401, "missing or wrong API key", {"WWW-Authenticate": 'Bearer realm="rag-assets"'})
        try:
            body = await read_body(request, QUERY_MAX_BODY, settings.service_body_timeout_s)
        except TooLarge:
            return _error(413, f"query body larger than {QUERY_MAX_BODY} bytes")
        except SlowBody:
            return _slow_body(settings)
        except BadRequest as e:
            return _error(400, str(e))
        except ClientDisconnect:
            return Response(status_code=400)
        try:
            q = parse_query(parse_json(body))
        except (EventError, BadRequest) as e:
            return _error(400, str(e))
        use_rerank = state.reranker is not None if q["rerank"] is None else q["rerank"]
        if use_rerank and state.reranker is None:
            return _error(400, "rerank: no reranker is configured (RAG_RERANK=off)")
        depth = candidate_depth(q["k"], settings.rerank_depth) if use_rerank else q["k"]
        t0 = time.perf_counter()
        try:
            # three (four) steps, and no connection is held while the embedder (reranker) waits on the network
            await run_in_threadpool(state.db, _precheck)
            vector = (
                None
                if (q["mode"] or settings.retrieval_mode) == "keyword"
                else await anyio.to_thread.run_sync(
                    embed_query, state.embedder, q["text"], limiter=state.embed_limiter
                )
            )
            res = await run_in_threadpool(state.db, lambda conn: _search(conn, vector, q, depth))
            if use_rerank:
                res = await anyio.to_thread.run_sync(
                    partial(rerank_result, state.reranker, q["text"], res, q["k"], on_error=settings.rerank_on_error),
                    limiter=state.embed_limiter,
                )
                if res.rerank is not None and not res.rerank.applied:
                    m.rerank_fallbacks.inc()
            out = res.as_dict()
        except EmptyIndex as e:
            return _error(503, str(e), {"Retry-After": str(EMPTY_INDEX_RETRY_S)})
        except RerankError as e:
            return _error(502, f"reranker failed: {e}")
        except QueryError as e:
            return _error(409, str(e))
        except TextTooLongError as e:
            return _error(400, str(e))
        except EmbeddingError as e:
            return _error(502, f"query embedder failed: {e}")
        except _DB_ERRORS as e:
            return _unavailable(e)
        m.query_latency.observe(time.perf_counter() - t0)
        return JSONResponse(out)

    def _health(conn: psycopg.Connection) -> dict:
        conn.execute("SELECT 1")
        live = live_generation(conn)
        return {"status": "ok", "database": "ok", "generation": live.id if live else None}

    async def healthz(request: Request) -> Response:
        try:
            out = await run_in_threadpool(state.db, _health, min(3.0, pool_timeout))
        except (*_DB_ERRORS, psycopg.Error) as e:
            return JSONResponse(
                {"status": "unavailable", "database": f"error: {type(e).__name__}", "generation": None},
                status_code=503,
            )
        return JSONResponse(out)

    def _scrape(conn: psycopg.Connection) -> tuple[int, float]:
        return inbox.inbox_stats(conn)

    async def metrics(request: Request) -> Response:
        try:
            pending, lag = await run_in_threadpool(state.db, _scrape, min(3.0, pool_timeout))
            m.inbox_pending.set(pending)
            m.inbox_lag.set(lag)
            m.database_up.set(1)
        except (*_DB_ERRORS, psycopg.Error):
            m.database_up.set(0)
        body, content_type = m.render(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    spec = openapi_spec(settings)

    async def openapi(request: Request) -> Response:
        return JSONResponse(spec)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)  # escaped: logsafe
        return _error(500, "internal error")

    app = Starlette(
        routes=[
            Route("/webhooks/documents", webhook, methods=["POST"]),
            Route("/query", query, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        lifespan=lifespan,
        middleware=[Middleware(MetricsMiddleware, metrics=m)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.service = state
    return app


class MetricsMiddleware:
    """Counts every HTTP answer by route template, method and status (pure ASGI: no body buffering)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "unmatched"
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.http_requests.labels(route, scope.get("method", ""), str(status)).inc()
            self.metrics.http_duration.labels(route).observe(time.perf_counter() - t0)


# --- OpenAPI --------------------------------------------------------------------------------

_ERROR = {
    "description": "error",
    "content": {
        "application/json": {
            "schema": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
        }
    },
}


def _err(description: str) -> dict:
    return {**_ERROR, "description": description}


def openapi_spec(settings: Settings) -> dict:
    """The OpenAPI 3.1 document served at ``/openapi.json`` (hand-written: Starlette has no models)."""
    scalar = {"type": ["string", "number", "boolean", "null"]}
    sig_header = settings.webhook_signature_header
    header = lambda name, desc: {  # noqa: E731
        "name": name,
        "in": "header",
        "required": False,
        "description": desc,
        "schema": {"type": "string"},
    }
    query_security = [{"bearer": []}] if settings.query_api_key else []
    hit = {
        "type": "object",
        "required": ["doc_id", "seq", "score", "text", "metadata", "chunk_id"],
        "properties": {
            "doc_id": {"type": "string"},
            "seq": {"type": "integer"},
            "score": {"type": "number"},
            "text": {"type": "string"},
            "metadata": {"type": "object"},
            "chunk_id": {"type": "string"},
            "pages": {
                "type": ["array", "null"],
                "items": {"type": "integer"},
                "description": "pages (slides, sheets) of a converted document the chunk spans",
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rag-assets service",
            "version": "1",
            "description": "Signed document webhooks in (durable inbox), top-k retrieval out.",
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/webhooks/documents": {
                "post": {
                    "operationId": "documentWebhook",
                    "summary": "Receive a signed document event (Standard Webhooks or sha256= header)",
                    "parameters": [
                        header("webhook-id", "event id (Standard Webhooks)"),
                        header("webhook-timestamp", "Unix seconds (Standard Webhooks, signed)"),
                        header("webhook-signature", "space-separated v1,<base64> HMAC-SHA256 signatures"),
                        header(sig_header, "sha256=<hex> HMAC-SHA256 of the raw body"),
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["type", "timestamp", "data"],
                                    "properties": {
                                        "type": {
                                            "type": "string",
                                            "enum": [
                                                "document.created",
                                                "document.updated",
                                                "document.deleted",
                                            ],
                                        },
                                        "timestamp": {"type": "string", "format": "date-time"},
                                        "id": {"type": "string"},
                                        "data": {
                                            "type": "object",
                                            "required": ["doc_id"],
                                            "properties": {
                                                "doc_id": {"type": "string", "minLength": 1},
                                                "content": {"type": "string"},
                                                "metadata": {"type": "object"},
                                            },
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "duplicate: this event id is already stored",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "202": {
                            "description": "accepted: committed to the inbox",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "400": _err(
                            "malformed JSON or invalid event (e.g. a non-canonical doc_id, or a source "
                            "timestamp before 1970 or further ahead than the tolerance)"
                        ),
                        "401": _err("missing or invalid signature, or timestamp outside the tolerance"),
                        "408": _err("body not received in time"),
                        "413": _err("body too large"),
                        "503": _err("database unavailable; retry"),
                    },
                }
            },
            "/query": {
                "post": {
                    "operationId": "query",
                    "summary": "Top-k chunks of the live index for a text",
                    "security": query_security,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["text"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "text": {
                                            "type": "string",
                                            "minLength": 1,
                                            "maxLength": QUERY_MAX_TEXT,
                                        },
                                        "k": {"type": "integer", "minimum": 1, "maximum": QUERY_MAX_K},
                                        "mode": {
                                            "type": "string",
                                            "enum": list(QUERY_MODES),
                                            "description": "ranking (default RAG_RETRIEVAL_MODE); "
                                            "score: cosine similarity, ts_rank_cd, or the fused RRF score",
                                        },
                                        "filter": {
                                            "type": "object",
                                            "maxProperties": FILTER_MAX_KEYS,
                                            "additionalProperties": {
                                                "anyOf": [
                                                    scalar,
                                                    {
                                                        "type": "array",
                                                        "items": scalar,
                                                        "maxItems": FILTER_MAX_LIST,
                                                    },
                                                ]
                                            },
                                        },
                                        "min_score": {
                                            "type": ["number", "null"],
                                            "minimum": -1,
                                            "maximum": 1,
                                        },
                                        "rerank": {
                                            "type": ["boolean", "null"],
                                            "description": "re-score the top RAG_RERANK_DEPTH candidates with the "
                                            "configured reranker (default: on when RAG_RERANK is set); "
                                            "score is then the reranker's",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "results, best first",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["results", "generation"],
                                        "properties": {
                                            "results": {"type": "array", "items": hit},
                                            "generation": {"type": ["integer", "null"]},
                                            "rerank": {
                                                "type": "object",
                                                "description": "present when reranked; applied false: the "
                                                "reranker failed and the hits are in first-stage order",
                                                "properties": {
                                                    "reranker": {"type": "string"},
                                                    "candidates": {"type": "integer"},
                                                    "applied": {"type": "boolean"},
                                                    "seconds": {"type": "number"},
                                                    "error": {"type": ["string", "null"]},
                                                },
                                            },
                                        },
                                    }
                                }
                            },
                        },
                        "400": _err("invalid query"),
                        "401": _err("missing or wrong API key"),
                        "408": _err("body not received in time"),
                        "409": _err("the live index cannot answer this query (embedder mismatch)"),
                        "413": _err("body too large"),
                        "502": _err("the query embedder failed (or the reranker, with RAG_RERANK_ON_ERROR=fail)"),
                        "503": _err("the index is empty, or the database is unavailable"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Database reachable; live generation",
                    "responses": {
                        "200": {
                            "description": "healthy",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["status", "generation"],
                                        "properties": {
                                            "status": {"type": "string"},
                                            "database": {"type": "string"},
                                            "generation": {"type": ["integer", "null"]},
                                        },
                                    }
                                }
                            },
                        },
                        "503": {
                            "description": "database unreachable",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {"description": "Prometheus text format", "content": {"text/plain": {}}}
                    },
                }
            },
        },
    }
