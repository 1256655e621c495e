"""Run the service on uvicorn: ``serve(settings, host, port)`` (``rag-assets serve`` calls it).

Also runnable as ``python -m rag_assets.service.server [--host H] [--port P]`` (settings from the
``RAG_*`` environment), which the tests and benchmarks use to start a real server process.

Slow clients: uvicorn times out only idle keep-alive connections, so a client that sends its
headers a byte at a time (slowloris), or connects and sends nothing, would hold its connection
forever. :func:`header_timeout_protocol` adds a header deadline (RAG_SERVICE_HEADER_TIMEOUT_S,
from the connection or the previous response to the end of the headers; then 408 and close) and
a bound on the header bytes (431). The app bounds the body read (RAG_SERVICE_BODY_TIMEOUT_S).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from rag_assets.settings import Settings, SettingsError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_HEADER_BYTES = 64 * 1024  # request line + headers; our requests send well under 4 KiB
KEEP_ALIVE_TIMEOUT_S = 5

_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_TOO_LARGE_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
)


def header_timeout_protocol(
    timeout_s: float, max_header_bytes: int = MAX_HEADER_BYTES
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol (httptools, else h11) with a deadline for each request's headers.

    The deadline starts when the connection opens and again when a response completes (the next
    request's headers), and ends when uvicorn has parsed a request's headers (it then starts a new
    request cycle). On expiry the client gets 408 and the connection is closed; more than
    ``max_header_bytes`` before the headers end gets 431. Bodies and responses are not affected.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover - httptools is a dependency of uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]

    class HeaderTimeoutProtocol(base):  # type: ignore[valid-type, misc]
        _rag_timer: asyncio.TimerHandle | None = None
        _rag_cycle: Any = None
        _rag_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._rag_arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._rag_cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            waiting = self._rag_timer is not None
            super().data_received(data)
            if not waiting:
                return
            if self._rag_headers_done():
                self._rag_cycle = self.cycle
                self._rag_cancel()
                return
            self._rag_bytes += len(data)
            if self._rag_bytes > max_header_bytes:
                self._rag_refuse(_TOO_LARGE_431)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self._rag_headers_done():  # a pipelined request was already parsed
                self._rag_cycle = self.cycle
            else:
                self._rag_arm()

        def _rag_headers_done(self) -> bool:
            return self.cycle is not None and self.cycle is not self._rag_cycle

        def _rag_arm(self) -> None:
            self._rag_cancel()
            self._rag_bytes = 0
            self._rag_timer = self.loop.call_later(timeout_s, self._rag_expired)

        def _rag_cancel(self) -> None:
            if self._rag_timer is not None:
                self._rag_timer.cancel()
                self._rag_timer = None

        def _rag_expired(self) -> None:
            self._rag_timer = None
            self._rag_refuse(_TIMEOUT_408)

        def _rag_refuse(self, response: bytes) -> None:
            self._rag_cancel()
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    HeaderTimeoutProtocol.__name__ = HeaderTimeoutProtocol.__qualname__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


def make_config(
    app: Any,
    settings: Settings,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    log_level: str = "info",
    access_log: bool = False,
) -> Any:
    """The ``uvicorn.Config`` the service runs with (also used by the tests' in-process server)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
        http=header_timeout_protocol(settings.service_header_timeout_s),
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


def serve(
    settings: Settings,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    log_level: str = "info",
    access_log: bool = False,
    indexes: dict[str, Settings] | None = None,
) -> None:
    """Build the app and serve it until interrupted (SIGINT/SIGTERM: graceful shutdown).

    ``indexes`` (name → settings, e.g. every index of a code location) serves each under
    ``/indexes/{name}``; without it, ``settings`` is the one index. Raises ``SettingsError`` before
    binding anything when an index has no webhook secret, and ``SystemExit(1)`` (uvicorn) when
    startup fails, e.g. the database cannot be reached.
    """
    import uvicorn

    from rag_assets.service.indexes import create_indexes_app

    app = create_indexes_app(indexes or {settings.index_name: settings})  # refuses without a webhook secret
    config = make_config(app, settings, host, port, log_level=log_level, access_log=access_log)
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
        from rag_assets.service.logsafe import escape_controls

        print(f"rag-assets serve: error: {escape_controls(str(e))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
