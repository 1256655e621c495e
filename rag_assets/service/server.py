"""Run the service on uvicorn: ``serve(settings, host, port)`` (``rag-assets serve`` calls it).

Also runnable as ``python -m rag_assets.service.server [--host H] [--port P]`` (settings from the
``RAG_*`` environment), which the tests and benchmarks use to start a real server process.
"""

from __future__ import annotations

import argparse
import sys

from rag_assets.settings import Settings, SettingsError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve(
    settings: Settings,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Build the app and serve it until interrupted (SIGINT/SIGTERM: graceful shutdown).

    Raises ``SettingsError`` before binding anything when no webhook secret is configured, and
    ``SystemExit(1)`` (uvicorn) when startup fails, e.g. the database cannot be reached.
    """
    import uvicorn

    from rag_assets.service.app import create_app

    app = create_app(settings)  # refuses to build without RAG_WEBHOOK_SECRET
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rag_assets.service.server", description=__doc__.splitlines()[0]
    )
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    try:
        serve(Settings.from_env(), args.host, args.port, log_level=args.log_level)
    except SettingsError as e:
        print(f"rag-assets serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
