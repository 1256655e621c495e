"""The index as an MCP server: read-only ``search`` and ``fetch`` tools for agents.

One :class:`mcp.server.mcpserver.MCPServer` per index, built on the same query code as the CLI and
``POST /query`` (``rag_assets/query.py``). Two ways to reach it:

- Streamable HTTP, mounted by ``rag-assets serve`` at ``/indexes/{name}/mcp`` (and ``/mcp`` for the
  root index): it shares the index app's connection pool and embedder, and the index's
  ``RAG_QUERY_API_KEY`` protects it exactly as it protects ``/query`` (``Authorization: Bearer``,
  compared in constant time, 401 without). Stateless JSON responses: no session lives in the
  process, so any replica can answer any request.
- stdio, ``rag-assets mcp``: one index, one dedicated connection, for agents that spawn a local
  process (stdout carries the protocol, so nothing else may print there).

The tools only read: ``search`` the live generation, ``fetch`` a current document (its normalised
body and manifest row).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio
import psycopg
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from rag_assets import query as rq
from rag_assets.embedders import Embedder, EmbeddingError
from rag_assets.rerank import Reranker, make_reranker
from rag_assets.settings import Settings

T = TypeVar("T")
_READ_ONLY = ToolAnnotations(
    readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False
)


@dataclass(frozen=True)
class SearchHits:
    """What ``search`` returns: the hits, best first, and the generation that answered."""

    results: list[rq.Hit]
    generation: int | None


@dataclass(frozen=True)
class Document:
    """What ``fetch`` returns: a document as the index currently has it (the manifest's view, which
    the next refresh indexes; the live generation may still be one refresh behind)."""

    doc_id: str
    text: str
    metadata: dict
    source: str
    content_hash: str
    size: int
    updated_at: str


@dataclass(frozen=True)
class IndexBackend:
    """How the tools reach one index: ``db`` runs a function on one of its connections."""

    name: str
    settings: Settings
    embedder: Embedder
    db: Callable[[Callable[[psycopg.Connection], Any]], Any]
    reranker: Reranker | None = None  # RAG_RERANK: applied to every search, after the connection is given back


def search_accepts_mode() -> bool:
    """Whether ``rag_assets.rq.search`` takes a ranking ``mode`` (hybrid / keyword retrieval);
    looked up at call time, so the tool follows the query code it runs with."""
    return "mode" in inspect.signature(rq.search).parameters


def run_search(
    backend: IndexBackend, text: str, k: int, filt: dict | None, mode: str | None
) -> rq.QueryResult:
    """The hits for ``text``. Without ``mode`` as ``POST /query`` does it (no connection is held
    while the embedder works); with one, through ``rq.search`` when it ranks by modes."""
    settings = backend.settings
    if filt is not None and not isinstance(filt, dict):
        raise rq.QueryError("filter must be an object of metadata key → value")
    if mode is None:
        backend.db(lambda conn: rq.check_embedder_matches(conn, backend.embedder))
        vector = rq.embed_query(backend.embedder, text)
        depth = k if backend.reranker is None else rq.candidate_depth(k, settings.rerank_depth)
        res = backend.db(
            lambda conn: rq.search_embedded(
                conn, backend.embedder, vector, depth, filt, ef_search=settings.hnsw_ef_search
            )
        )
        if backend.reranker is None:
            return res
        from rag_assets.rerank.apply import rerank_result

        return rerank_result(backend.reranker, text, res, k, on_error=settings.rerank_on_error)
    if not search_accepts_mode():
        if mode != "vector":
            raise rq.QueryError(
                f"mode {mode!r}: this version ranks by vector similarity only (mode 'vector')"
            )
        return run_search(backend, text, k, filt, None)
    rerank = (
        {"reranker": backend.reranker, "rerank_depth": settings.rerank_depth, "rerank_on_error": settings.rerank_on_error}
        if backend.reranker is not None
        else {}
    )
    return backend.db(
        lambda conn: rq.search(
            conn, backend.embedder, text, k, filt, mode=mode, ef_search=settings.hnsw_ef_search, **rerank
        )
    )


def fetch_document(conn: psycopg.Connection, doc_id: str) -> Document | None:
    """The manifest row and normalised body of ``doc_id``, or None when the index has no such document."""
    try:
        row = conn.execute(
            "SELECT m.doc_id, b.body, m.metadata, m.source, m.content_hash, m.size, m.updated_at "
            "FROM manifest m JOIN document_bodies b ON b.doc_id = m.doc_id WHERE m.doc_id = %s",
            (doc_id,),
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return None  # never indexed: no document at all
    if row is None:
        return None
    did, body, metadata, source, content_hash, size, updated_at = row
    stamp = updated_at.isoformat() if isinstance(updated_at, datetime) else str(updated_at)
    return Document(
        did, body, metadata if isinstance(metadata, dict) else {}, source, content_hash, size, stamp
    )


def _tool_error(e: BaseException) -> ToolError:
    """An anticipated failure, as the agent should read it (the message names the cause)."""
    if isinstance(e, EmbeddingError):
        return ToolError(f"query embedder failed: {e}")
    if isinstance(e, psycopg.OperationalError | ConnectionError | TimeoutError):
        return ToolError(f"the index database is unavailable ({type(e).__name__}); try again")
    return ToolError(str(e))


def build_mcp(backend: IndexBackend) -> MCPServer:
    """The MCP server of one index, its tools bound to ``backend``."""
    mcp: MCPServer = MCPServer(
        f"rag-assets-{backend.name}",
        instructions=(
            f"Retrieval over the rag-assets index {backend.name!r}: `search` finds the chunks that best "
            "answer a question; `fetch` returns a whole document by the doc_id a hit names."
        ),
        log_level="WARNING",
    )

    @mcp.tool(annotations=_READ_ONLY)
    async def search(
        query: str, k: int = 5, filter: dict | None = None, mode: str | None = None
    ) -> SearchHits:
        """Top-k chunks of the index for a question, best first. `filter` keeps only chunks whose
        metadata matches every key (equal, or contained in a list value); `mode` picks the ranking
        where the index offers several (default: vector similarity)."""
        try:
            res = await anyio.to_thread.run_sync(run_search, backend, query, k, filter, mode)
        except (rq.QueryError, EmbeddingError, psycopg.OperationalError, ConnectionError, TimeoutError) as e:
            raise _tool_error(e) from None
        return SearchHits(list(res.results), res.generation)

    @mcp.tool(annotations=_READ_ONLY)
    async def fetch(doc_id: str) -> Document:
        """The whole current document `doc_id` (as a search hit names it): its normalised text and metadata."""
        try:
            doc = await anyio.to_thread.run_sync(backend.db, lambda conn: fetch_document(conn, doc_id))
        except (psycopg.OperationalError, ConnectionError, TimeoutError) as e:
            raise _tool_error(e) from None
        if doc is None:
            raise ToolError(f"unknown document {doc_id!r}: index {backend.name!r} has no such doc_id")
        return doc

    return mcp


class McpEndpoint:
    """The Streamable HTTP endpoint of one index: the query API key first, then the MCP transport.

    Its :meth:`lifespan` must run for the app's lifetime (``service/indexes.py`` enters it)."""

    def __init__(self, mcp: MCPServer, authorized: Callable[[str | None], bool]):
        mcp.streamable_http_app(  # creates the session manager; the route is ours (auth in front)
            stateless_http=True,
            json_response=True,
            # the API key is the protection, as for /query (its host is the deployment's choice)
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self.manager: StreamableHTTPSessionManager = mcp.session_manager
        self.authorized = authorized

    def lifespan(self):
        return self.manager.run()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = None
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                header = v.decode("latin-1")
                break
        if not self.authorized(header):
            resp = JSONResponse(
                {"error": "missing or wrong API key"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="rag-assets"'},
            )
            await resp(scope, receive, send)
            return
        await self.manager.handle_request(scope, receive, send)


def http_endpoint(name: str, app) -> McpEndpoint:
    """The MCP endpoint of the index served by ``app`` (``service/app.py:create_app``): its pool,
    embedder and query key."""
    import mcp.server.lowlevel.server as lowlevel
    import mcp.server.mcpserver.server as high
    import mcp.server.streamable_http as transport
    import mcp.server.streamable_http_manager as manager

    from rag_assets.service import logsafe

    # the SDK's records can quote a client's tool arguments: escaped like the service's own
    logsafe.install(*(m.logger.name for m in (lowlevel, high, transport, manager)))
    state = app.state.service
    backend = IndexBackend(name, state.settings, state.embedder, state.db, state.reranker)
    return McpEndpoint(build_mcp(backend), state.query_authorized)


def serve_stdio(settings: Settings) -> None:
    """``rag-assets mcp``: serve one index on stdin/stdout until the client closes it."""
    from rag_assets.embedders import make_embedder
    from rag_assets.store.db import connect_index

    conn = connect_index(settings)
    lock = threading.Lock()  # one connection; tool calls may run in several worker threads

    def db(fn: Callable[[psycopg.Connection], T]) -> T:
        with lock:
            return fn(conn)

    embedder = make_embedder(settings)
    reranker = make_reranker(settings)
    try:
        build_mcp(IndexBackend(settings.index_name, settings, embedder, db, reranker)).run("stdio")
    finally:
        embedder.close()
        if reranker is not None:
            reranker.close()
        conn.close()
