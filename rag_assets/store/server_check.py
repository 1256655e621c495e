"""A self-check of a PostgreSQL server before rag_assets first uses it: is pgvector there, recent
enough, and does it actually compute on this machine?

Why: a pgvector built with ``-march=native`` on an AVX-512 host loads fine on a CPU without AVX-512
and only dies (SIGILL) at the first distance computation, deep inside a Dagster run, as a lost
connection with no cause. The check runs one distance and one tiny HNSW build in a throwaway
session, so such a server is refused up front with one message that names the server, the
extension version and the likely cause.

The result is cached per server *process* (keyed by the server's start time, version and
extension version) in memory and in a small file under the user cache folder, so a CLI call pays
for it once per server start, not once per command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

# Iterative index scans (hnsw.iterative_scan: filtered queries that still return k rows) are 0.8.0.
MIN_PGVECTOR = (0, 8, 0)
EXTENSION = "vector"

_checked: set[str] = set()


class ServerCheckError(ConnectionError):
    """The server cannot serve rag_assets; the message names the server, the version and the cause."""


@dataclass(frozen=True)
class ServerInfo:
    """What the check learned about a server (and what its cache key is made of)."""

    server: str
    server_version: str
    pgvector_version: str
    started_at: str

    def cache_key(self) -> str:
        raw = f"{self.server}|{self.server_version}|{self.pgvector_version}|{self.started_at}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]


def describe_server(url: str) -> str:
    """``host:port/db`` (or the socket folder) without user or password, for messages."""
    if "://" not in url:  # key=value connection string: never echo it (it may hold a password)
        try:
            info = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            return "the configured PostgreSQL server"
        host, port, db = info.get("host", "localhost"), info.get("port", "5432"), info.get("dbname", "")
        return f"{host}:{port}/{db}"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "the configured PostgreSQL server"
    if not host:
        from urllib.parse import parse_qs

        host = parse_qs(parts.query).get("host", ["local socket"])[0]
    return f"{host}{f':{port}' if port else ''}{parts.path or '/'}"


def parse_version(v: str) -> tuple[int, ...]:
    out = []
    for piece in v.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def cpu_lacks_avx512() -> bool | None:
    """True/False from /proc/cpuinfo; None where it cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return " avx512f" not in text


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rag-assets" / "server-checks.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, info: ServerInfo) -> None:
    path = _cache_file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = {"server": info.server, "pgvector": info.pgvector_version, "checked_at": time.time()}
        if len(data) > 200:  # old server processes: keep the newest
            data = dict(sorted(data.items(), key=lambda kv: kv[1].get("checked_at", 0))[-200:])
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".server-checks.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)


def _server_info(conn: psycopg.Connection, server: str) -> ServerInfo:
    row = conn.execute(
        "SELECT current_setting('server_version'), pg_postmaster_start_time()::text, "
        "(SELECT extversion FROM pg_extension WHERE extname = %s)",
        (EXTENSION,),
    ).fetchone()
    return ServerInfo(server, row[0], row[2] or "", row[1])


def _ensure_extension(conn: psycopg.Connection, server: str) -> str:
    """Create or update pgvector as needed; return the installed version, or raise naming the cause."""
    row = conn.execute(
        "SELECT default_version, installed_version FROM pg_available_extensions WHERE name = %s",
        (EXTENSION,),
    ).fetchone()
    pg_version = conn.execute("SHOW server_version").fetchone()[0]
    if row is None:
        raise ServerCheckError(
            f"PostgreSQL {pg_version} at {server} has no pgvector extension ('{EXTENSION}' is not in "
            f"pg_available_extensions): install pgvector >= {'.'.join(map(str, MIN_PGVECTOR))} on the "
            "server (a portable build), or unset RAG_DATABASE_URL to use the embedded server"
        )
    default_version, installed = row
    try:
        if installed is None or parse_version(installed) < parse_version(default_version):
            # Serialised: concurrent first runs would otherwise race on pg_extension's name index
            # (CREATE EXTENSION IF NOT EXISTS is not atomic against itself).
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('rag.extension'))")
                if installed is None:
                    conn.execute(f"CREATE EXTENSION IF NOT EXISTS {EXTENSION}")
                else:
                    # The server has newer binaries than the catalog says (an upgrade): catch up.
                    conn.execute(f"ALTER EXTENSION {EXTENSION} UPDATE")
    except psycopg.errors.InsufficientPrivilege:
        if installed is None:
            raise ServerCheckError(
                f"pgvector {default_version} is available on PostgreSQL {pg_version} at {server} but not "
                "installed in this database, and this user may not CREATE EXTENSION: ask an owner to run "
                f"CREATE EXTENSION {EXTENSION}"
            ) from None
    installed = conn.execute(
        "SELECT extversion FROM pg_extension WHERE extname = %s", (EXTENSION,)
    ).fetchone()[0]
    if parse_version(installed) < MIN_PGVECTOR:
        raise ServerCheckError(
            f"PostgreSQL {pg_version} at {server} has pgvector {installed}; rag_assets needs >= "
            f"{'.'.join(map(str, MIN_PGVECTOR))} (iterative HNSW scans): upgrade pgvector and run "
            f"ALTER EXTENSION {EXTENSION} UPDATE"
        )
    return installed


# Each step computes: a distance, a norm, and an HNSW build + index scan (the paths that died).
_STEPS = [
    ("a cosine distance", "SELECT '[1,2,3]'::vector <=> '[3,2,1]'::vector"),
    ("a vector norm", "SELECT vector_norm('[3,4,0]'::vector)"),
    (
        "an HNSW build",
        "CREATE TEMP TABLE rag_server_check ON COMMIT DROP AS "
        "SELECT i AS id, ARRAY[i, i * 7 % 11, i * 3 % 5, 1]::real[]::vector(4) AS e "
        "FROM generate_series(1, 64) AS i",
    ),
    ("an HNSW build", "CREATE INDEX ON rag_server_check USING hnsw (e vector_cosine_ops)"),
    ("an HNSW index scan", "SET LOCAL enable_seqscan = off"),
    ("an HNSW index scan", "SELECT id FROM rag_server_check ORDER BY e <=> '[1,1,1,1]' LIMIT 3"),
]


def check_server(url: str, *, _before_step=None) -> ServerInfo:
    """Run the self-check once per server process; raise :class:`ServerCheckError` naming the cause.

    ``_before_step(conn, index)`` is a test hook (called before each computing step with the
    throwaway session), used to make a real backend die where a CPU would.
    """
    server = describe_server(url)
    with psycopg.connect(url, autocommit=True, connect_timeout=30) as conn:
        info = _server_info(conn, server)
        key = info.cache_key()
        if key in _checked or (info.pgvector_version and key in _read_cache() and _before_step is None):
            _checked.add(key)
            return info
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=30)
    except psycopg.OperationalError as e:
        from rag_assets.redact import scrub

        raise ServerCheckError(f"cannot connect to PostgreSQL at {server}: {scrub(str(e), url)}".strip()) from None
    pg_version, version, step = info.server_version, info.pgvector_version, "connecting"
    try:
        version = _ensure_extension(conn, server)
        with conn.transaction():
            for i, (step, stmt) in enumerate(_STEPS):  # noqa: B007 - step names the failure below
                if _before_step is not None:
                    _before_step(conn, i)
                conn.execute(stmt)
            conn.execute("SELECT 1")
            raise _Rollback
    except _Rollback:
        pass
    except psycopg.OperationalError as e:
        raise ServerCheckError(_crash_message(server, pg_version, version, step, e)) from None
    except psycopg.Error as e:
        raise ServerCheckError(
            f"PostgreSQL {pg_version} at {server} with pgvector {version or '?'} failed its self-check at "
            f"{step}: {type(e).__name__}: {str(e).strip()}"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    info = ServerInfo(server, pg_version, version, info.started_at)
    # The extension may have just been created or updated: cache under the key the next call sees.
    _checked.add(info.cache_key())
    _write_cache(info.cache_key(), info)
    return info


class _Rollback(Exception):
    """Ends the check's transaction: nothing it made survives."""


def _crash_message(server: str, pg_version: str, version: str, step: str, e: Exception) -> str:
    lacks = cpu_lacks_avx512()
    cpu = {
        True: "this CPU has no AVX-512",
        False: "this machine's CPU has AVX-512, so check the server's CPU",
        None: "check the server's CPU flags",
    }[lacks]
    return (
        f"the PostgreSQL {pg_version} backend at {server} died during {step} with pgvector "
        f"{version or '?'} ({str(e).strip().splitlines()[0] if str(e).strip() else 'connection lost'}). "
        "Likely cause: the pgvector extension was built for CPU instructions this machine lacks "
        f"(e.g. -march=native on an AVX-512 host; {cpu}). Install a portable pgvector build "
        "(the embedded default ships one: unset RAG_DATABASE_URL), or see the server log for the signal"
    )


def ensure_checked(url: str) -> None:
    """The cached entry point used by :func:`rag_assets.store.db.connect`."""
    if url in _checked:
        return
    check_server(url)
    _checked.add(url)
