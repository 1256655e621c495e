"""One service for every index of a code location: ``/indexes/{name}/...`` per index.

Each index gets the whole single-index app (``service/app.py``) mounted under its name: its own
webhook signing secret and query key (from its own variables, ``Settings.with_secrets``), its own
database pool on its own schema, its own metrics. The ``default`` index (or the only index) is
also served at the root, so clients of a one-index deployment keep their URLs. Agents reach each
index over MCP at ``/indexes/{name}/mcp`` (``/mcp`` for the root index; ``service/mcp_server.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AsyncExitStack, asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from rag_assets.settings import DEFAULT_INDEX, Settings


def root_index(indexes: Mapping[str, Settings]) -> str | None:
    """The index also served at ``/``: ``default`` if defined, else the only one."""
    if DEFAULT_INDEX in indexes:
        return DEFAULT_INDEX
    return next(iter(indexes)) if len(indexes) == 1 else None


def create_indexes_app(indexes: Mapping[str, Settings], **app_kw) -> Starlette:
    """The ASGI app serving ``indexes`` (name → settings). Refuses to build, naming the index, when
    one of them has no usable webhook secret."""
    from rag_assets.service.app import create_app
    from rag_assets.settings import SettingsError

    if not indexes:
        raise SettingsError("no index to serve (the code location defines none)")
    apps: dict[str, Starlette] = {}
    for name, settings in indexes.items():
        try:
            apps[name] = create_app(settings, **app_kw)
        except SettingsError as e:
            raise SettingsError(f"index {name!r}: {e}") from None
    root = root_index(indexes)
    from rag_assets.service.mcp_server import http_endpoint

    mcps = {n: http_endpoint(n, a) for n, a in apps.items()}  # MCP per index, behind its query key

    @asynccontextmanager
    async def lifespan(app: Starlette):
        async with AsyncExitStack() as stack:
            for sub in apps.values():  # each index attaches its own database pool
                await stack.enter_async_context(sub.router.lifespan_context(sub))
            for endpoint in mcps.values():
                await stack.enter_async_context(endpoint.lifespan())
            yield

    async def list_indexes(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "indexes": [
                    {
                        "name": n,
                        "query": f"/indexes/{n}/query",
                        "webhooks": f"/indexes/{n}/webhooks/documents",
                        "mcp": f"/indexes/{n}/mcp",
                    }
                    for n in apps
                ],
                "root": root,
            }
        )

    routes: list = [Route("/indexes", list_indexes, methods=["GET"])]
    # before the mounts, which would otherwise take these paths (an ASGI endpoint: every method)
    routes += [Route(f"/indexes/{n}/mcp", endpoint=e) for n, e in mcps.items()]
    if root is not None:
        routes.append(Route("/mcp", endpoint=mcps[root]))
    routes += [Mount(f"/indexes/{n}", app=a) for n, a in apps.items()]
    if root is not None:
        routes.append(Mount("/", app=apps[root]))
    app = Starlette(routes=routes, lifespan=lifespan)
    # the server's own settings (header and body timeouts) come from the root or first index
    app.state.service = apps[root or next(iter(apps))].state.service
    return app
