"""The HTTP service: signed document webhooks into the durable inbox, and queries out.

``create_app(settings)`` (``rag_assets.service.app``) builds the ASGI app;
``serve(settings, host, port)`` (``rag_assets.service.server``) runs it on uvicorn. Imported lazily
so ``python -m rag_assets.service.server`` does not import its own module twice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from rag_assets.service.app import create_app

        return create_app
    if name == "serve":
        from rag_assets.service.server import serve

        return serve
    raise AttributeError(name)
