"""The MCP server (``rag_assets/service/mcp_server.py``) through the SDK's own clients.

Streamable HTTP against the real service (``create_indexes_app``, as ``rag-assets serve`` builds
it, on 127.0.0.1 through uvicorn), and stdio against ``python -m rag_assets.cli mcp`` as a
subprocess: list the tools, search, fetch, an unknown document, and the query API key.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import anyio
import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from rag_assets.pipeline import Indexer
from rag_assets.service.indexes import create_indexes_app
from tests.service_utils import ThreadServer, new_secret

ROOT = Path(__file__).resolve().parents[1]

DOCS = {
    "guide/vectors.md": "# Vectors\n\nA vector index answers nearest-neighbour questions over embeddings.\n",
    "guide/snapshots.md": "# Snapshots\n\nSnapshots are content-addressed Parquet copies of the index.\n",
    "notes/cooking.md": "# Soup\n\nSimmer the onions slowly, then add the stock and the thyme.\n",
}


def _index(settings, docs_dir: Path) -> None:
    for rel, text in DOCS.items():
        p = docs_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    idx = Indexer(settings)
    try:
        rep = idx.refresh(docs_dir)
    finally:
        idx.close()
    assert rep.docs_total == len(DOCS)


def _serve(indexes: dict) -> ThreadServer:
    app = create_indexes_app(indexes)
    app.state.service = SimpleNamespace(settings=next(iter(indexes.values())))  # ThreadServer's config
    return ThreadServer(app)


async def _session_call(url: str, key: str | None, fn):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return await fn(session)


def _payload(result) -> dict:
    """A tool result's structured content (its JSON text copy must say the same)."""
    assert not result.is_error, result.content
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


async def _exercise(session: ClientSession) -> None:
    tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == {"search", "fetch"}
    assert set(tools["search"].input_schema["properties"]) == {"query", "k", "filter", "mode"}
    assert tools["search"].annotations.read_only_hint and tools["fetch"].annotations.read_only_hint

    out = _payload(await session.call_tool("search", {"query": "nearest-neighbour vector index", "k": 2}))
    hits = out["results"]
    assert len(hits) == 2 and out["generation"] is not None
    assert set(hits[0]) == {"doc_id", "seq", "score", "text", "metadata", "chunk_id", "pages"}
    assert hits[0]["doc_id"] == "guide/vectors.md" and "nearest-neighbour" in hits[0]["text"]
    assert hits[0]["score"] >= hits[1]["score"]

    # a metadata filter keeps only matching chunks
    filt = {"path": "notes/cooking.md"}
    out = _payload(await session.call_tool("search", {"query": "vector index", "k": 5, "filter": filt}))
    assert [h["doc_id"] for h in out["results"]] == ["notes/cooking.md"]

    doc = _payload(await session.call_tool("fetch", {"doc_id": "guide/snapshots.md"}))
    assert doc["doc_id"] == "guide/snapshots.md"
    assert "content-addressed Parquet" in doc["text"] and doc["metadata"]["path"] == "guide/snapshots.md"
    assert doc["content_hash"] and doc["size"] == len(DOCS["guide/snapshots.md"].encode())

    missing = await session.call_tool("fetch", {"doc_id": "guide/nope.md"})
    assert missing.is_error and "unknown document 'guide/nope.md'" in missing.content[0].text

    # mode "vector" is the default ranking, by whichever query code runs; an unknown mode is refused
    vec = _payload(
        await session.call_tool(
            "search", {"query": "nearest-neighbour vector index", "k": 2, "mode": "vector"}
        )
    )
    assert [(h["doc_id"], h["seq"]) for h in vec["results"]] == [(h["doc_id"], h["seq"]) for h in hits]
    odd = await session.call_tool("search", {"query": "vector", "mode": "no-such-mode"})
    assert odd.is_error and "no-such-mode" in odd.content[0].text

    bad = await session.call_tool("search", {"query": "x", "k": 0})
    assert bad.is_error and "k=0" in bad.content[0].text
    empty = await session.call_tool("search", {"query": "   "})
    assert empty.is_error and "empty" in empty.content[0].text


@pytest.fixture
def svc_settings(settings):
    return replace(settings, webhook_secret=new_secret())


def test_http_tools_on_every_index_and_root(svc_settings, docs_dir):
    _index(svc_settings, docs_dir)
    name = svc_settings.index_name
    with _serve({name: svc_settings}) as srv:
        listing = httpx.get(srv.url + "/indexes").json()
        assert listing["indexes"][0]["mcp"] == f"/indexes/{name}/mcp"
        for path in (f"/indexes/{name}/mcp", "/mcp"):  # the only index is the root index too
            anyio.run(_session_call, srv.url + path, None, _exercise)
        # the index's other routes still answer beside the MCP endpoint
        assert httpx.get(srv.url + f"/indexes/{name}/healthz").status_code == 200


def test_http_needs_the_query_key(svc_settings, docs_dir):
    s = replace(svc_settings, query_api_key="mcp-s3cret-key")
    _index(s, docs_dir)
    with _serve({s.index_name: s}) as srv:
        url = srv.url + f"/indexes/{s.index_name}/mcp"
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        accept = {"Accept": "application/json, text/event-stream"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "mcp-s3cret-key"}):
            r = httpx.post(url, json=init, headers={**accept, **headers})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), headers
            assert httpx.post(srv.url + "/mcp", json=init, headers={**accept, **headers}).status_code == 401

        # the SDK's client is refused without the key (its error, inside its task groups), works with it
        with pytest.raises(ExceptionGroup) as e:
            anyio.run(_session_call, url, None, lambda session: session.list_tools())
        assert e.group_contains(MCPError, match="error response")
        tools = anyio.run(_session_call, url, "mcp-s3cret-key", lambda session: session.list_tools())
        assert {t.name for t in tools.tools} == {"search", "fetch"}


def test_stdio_round_trip(settings, docs_dir):
    _index(settings, docs_dir)
    env = {
        "RAG_DATABASE_URL": settings.database_url,
        "RAG_HOME": str(settings.home),
        "RAG_INDEX_NAME": settings.index_name,
        "RAG_PG_SCHEMA": settings.pg_schema,
        "RAG_SHARDS": str(settings.shards),
        "PYTHONPATH": str(ROOT),
    }
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "rag_assets.cli", "mcp"], env=env, cwd=ROOT
    )

    async def run() -> None:
        with anyio.fail_after(60):
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                await _exercise(session)

    anyio.run(run)


def test_http_each_index_answers_from_its_own_rows(svc_settings, docs_dir, tmp_path):
    _index(svc_settings, docs_dir)
    other_docs = tmp_path / "other"
    (other_docs / "faq").mkdir(parents=True)
    (other_docs / "faq/billing.md").write_text(
        "# Billing\n\nInvoices are sent on the first day of the month.\n"
    )
    other = replace(svc_settings, index_name="faq_idx", pg_schema="faq_idx", source_path=other_docs)
    idx = Indexer(other)
    try:
        idx.refresh(other_docs)
    finally:
        idx.close()

    async def doc_ids(session: ClientSession) -> set[str]:
        out = _payload(await session.call_tool("search", {"query": "vector index invoices", "k": 10}))
        return {h["doc_id"] for h in out["results"]}

    with _serve({svc_settings.index_name: svc_settings, "faq_idx": other}) as srv:
        assert anyio.run(_session_call, srv.url + "/indexes/faq_idx/mcp", None, doc_ids) == {"faq/billing.md"}
        mine = anyio.run(_session_call, srv.url + f"/indexes/{svc_settings.index_name}/mcp", None, doc_ids)
        assert mine == set(DOCS)
        assert httpx.post(srv.url + "/mcp", json={}).status_code == 404  # two indexes, none named default
