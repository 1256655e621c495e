"""Process and GraphQL helpers for the end-to-end tests and benchmarks that run real Dagster processes.

Every process is started in its own session (``start_new_session=True``), so it and everything it
spawns (webserver, daemon, code server, run workers, step workers) share one session id. Stopping
sends SIGINT, then SIGTERM, then SIGKILL to the process group, and finally SIGKILL to any process
still in the session (a child that moved to its own process group), by pid. Nothing is left behind.

Used by tests/test_e2e_dagster_dev.py, tests/test_production.py, tests/test_ui_browser.py and the
benchmarks (which import this module by path).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import WORDS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ASSETS = ("document_manifest", "chunks", "embeddings")
ACTIVE_RUN_STATUSES = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")

# ---------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """All live processes whose session id is ``sid`` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d.name))
    return out


@dataclass
class Proc:
    """One process started in its own session, with its output in a log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace_s: float = 20.0) -> list[str]:
        """SIGINT → SIGTERM → SIGKILL on the group, then SIGKILL any pid left in the session.

        Returns a list of what had to be escalated (empty when SIGINT sufficed)."""
        notes: list[str] = []
        sid = self.pid
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not session_pids(sid) and not self.alive():
                break
            if sig != signal.SIGINT:
                notes.append(f"{self.name}: sent {sig.name}")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=0.2)
                if not self.alive() and not session_pids(sid):
                    break
        for pid in session_pids(sid):  # children that left the process group but not the session
            notes.append(f"{self.name}: killed straggler {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        return notes


def _default_signals() -> None:
    """In the child before exec: SIGINT/SIGTERM back to their defaults. A parent started without job
    control (a background job of a non-interactive shell) ignores SIGINT, the child would inherit
    that, and `dagster dev` (which maps SIGTERM onto its SIGINT handling) could then not be stopped."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start(name: str, cmd: list[str], env: Mapping[str, str], log_dir: Path, cwd: Path = REPO) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    try:
        popen = subprocess.Popen(
            cmd,
            env=dict(env),
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_signals,
        )
    finally:
        log.close()
    return Proc(name, popen, log_path)


class ProcessSet:
    """Processes started together and stopped together (in reverse order), even on failure."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path = REPO) -> Proc:
        p = start(name, cmd, env, self.log_dir, cwd)
        self.procs.append(p)
        return p

    def check_alive(self) -> None:
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{p.log_tail()}")

    def logs(self, n: int = 40) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log_tail(n)}" for p in self.procs)

    def stop_all(self) -> list[str]:
        notes: list[str] = []
        for p in reversed(self.procs):
            notes += p.stop()
        left = [pid for p in self.procs for pid in session_pids(p.pid)]
        if left:
            notes.append(f"left running: {left}")
        return notes

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def wait_for(
    pred: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.5,
    check: Callable[[], None] | None = None,
):
    """Poll ``pred`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        if check:
            check()
        try:
            v = pred()
            if v:
                return v
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:.0f}s waiting for {what}"
        + (f" (last error: {last_exc})" if last_exc else "")
    )


# ---------------------------------------------------------------------------------------------
# environment


def base_env(**extra: str | None) -> dict[str, str]:
    """The current environment without any RAG_/DAGSTER_ settings, plus ``extra`` (None removes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_", "PG"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def pg_env(url: str) -> dict[str, str]:
    """DAGSTER_PG_* (deploy/dagster.yaml) for a server URL. A socket-only server (``?host=/dir``, no host
    name) gets an empty DAGSTER_PG_HOST and PGHOST=/dir: libpq then connects through the socket."""
    from urllib.parse import parse_qs, urlsplit

    u = urlsplit(url)
    sock = parse_qs(u.query).get("host", [""])[0]
    env = {
        "DAGSTER_PG_HOST": u.hostname or "",
        "DAGSTER_PG_PORT": str(u.port or 5432),
        "DAGSTER_PG_USER": u.username or "postgres",
        "DAGSTER_PG_PASSWORD": u.password or "",
        "DAGSTER_PG_DB": u.path.lstrip("/"),
    }
    if sock and not u.hostname:
        env["PGHOST"] = sock
    return env


def listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def start_production(
    procs: ProcessSet,
    env: Mapping[str, str],
    grpc_port: int,
    port: int,
    workspace: Path = REPO / "deploy" / "workspace.grpc.yaml",
    timeout: float = 150,
    target: tuple[str, ...] = ("-m", "rag_assets.definitions", "-a", "defs"),
) -> Dagster:
    """The three production processes: the gRPC code server, dagster-webserver and dagster-daemon.

    ``env`` must carry DAGSTER_HOME, DAGSTER_CODE_SERVER_HOST/PORT (for the workspace) and the RAG_*
    settings; returns a GraphQL client once the code location is loaded."""
    procs.start(
        "code-server",
        [
            str(BIN / "dagster"),
            "code-server",
            "start",
            "-h",
            "127.0.0.1",
            "-p",
            str(grpc_port),
            *target,
            "--location-name",
            "rag_assets",
        ],
        env,
    )
    wait_for(lambda: listening(grpc_port), 90, "the gRPC code server", check=procs.check_alive)
    procs.start(
        "webserver",
        [str(BIN / "dagster-webserver"), "-w", str(workspace), "-h", "127.0.0.1", "-p", str(port)],
        env,
    )
    procs.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env)
    api = Dagster(port)
    api.wait_loaded(timeout=timeout, check=procs.check_alive)
    return api


def dagster_dev_argv(port: int, workspace: Path | None = None) -> list[str]:
    """`dagster dev` on 127.0.0.1:``port`` for ``workspace`` (the project's workspace.yaml by default)."""
    ws = workspace or REPO / "workspace.yaml"
    return [str(BIN / "dagster"), "dev", "-w", str(ws), "-h", "127.0.0.1", "-p", str(port)]


def write_corpus(
    folder: Path, n_docs: int, seed: int = 7, min_bytes: int = 300, max_bytes: int = 1200, subdirs: int = 0
) -> list[str]:
    """Deterministic markdown documents; returns their relative paths (the doc ids)."""
    words = [
        *WORDS,
        "orchestration",
        "daemon",
        "launcher",
        "coordinator",
        "queue",
        "worker",
        "pool",
        "throughput",
        "freshness",
    ]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_docs):
        target = rng.randint(min_bytes, max_bytes)
        parts = [f"# Document {i} {rng.choice(words)} {rng.choice(words)}", ""]
        size = len(parts[0])
        while size < target:
            if rng.random() < 0.15:
                line = f"## {rng.choice(words).title()} {rng.choice(words)}"
            else:
                n = rng.randint(8, 30)
                line = " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."
            parts += [line, ""]
            size += len(line) + 2
        rel = f"d{i % subdirs:03d}/doc{i:06d}.md" if subdirs else f"doc{i:06d}.md"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("\n".join(parts), encoding="utf-8")
        ids.append(rel)
    return ids


# ---------------------------------------------------------------------------------------------
# GraphQL


class GraphQLError(RuntimeError):
    pass


class Dagster:
    """A tiny GraphQL client for a running webserver."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.base = f"http://{host}:{port}"

    def gql(self, query: str, variables: dict | None = None, timeout: float = 60.0) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(
            f"{self.base}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
        if out.get("errors"):
            raise GraphQLError(json.dumps(out["errors"])[:2000])
        return out["data"]

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/server_info", timeout=5) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def location_status(self) -> list[dict]:
        d = self.gql(
            """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
                 locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
        )
        return d["workspaceOrError"].get("locationEntries", [])

    def wait_loaded(self, timeout: float = 120.0, location: str = "rag_assets", check=None) -> float:
        """Wait for the webserver and the code location; returns the seconds it took."""
        t0 = time.monotonic()
        wait_for(self.up, timeout, "the webserver", check=check)

        def loaded():
            for e in self.location_status():
                if e["name"] != location:
                    continue
                kind = (e.get("locationOrLoadError") or {}).get("__typename")
                if kind == "PythonError":
                    raise GraphQLError(f"code location failed to load: {e['locationOrLoadError']['message']}")
                return kind == "RepositoryLocation" and e["loadStatus"] == "LOADED"
            return False

        wait_for(
            loaded, max(1.0, timeout - (time.monotonic() - t0)), f"code location {location}", check=check
        )
        return time.monotonic() - t0

    def launch_backfill(
        self,
        assets: Iterable[str] = ASSETS,
        partitions: list[str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        params: dict = {"assetSelection": [{"path": [a]} for a in assets]}
        if partitions is None:
            params["allPartitions"] = True
        else:
            params["partitionNames"] = partitions
        if tags:
            params["tags"] = [{"key": k, "value": v} for k, v in tags.items()]
        d = self.gql(
            """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
                 __typename ... on LaunchBackfillSuccess { backfillId }
                 ... on PythonError { message stack } ... on InvalidSubsetError { message }
                 ... on UnauthorizedError { message } } }""",
            {"p": params},
        )["launchPartitionBackfill"]
        if d["__typename"] != "LaunchBackfillSuccess":
            raise GraphQLError(f"backfill not launched: {d}")
        return d["backfillId"]

    def backfill(self, backfill_id: str) -> dict:
        d = self.gql(
            """query($id: String!) { partitionBackfillOrError(backfillId: $id) { __typename
                 ... on PartitionBackfill { id status numPartitions
                   runs { runId status tags { key value } } }
                 ... on PythonError { message } } }""",
            {"id": backfill_id},
        )["partitionBackfillOrError"]
        if d["__typename"] != "PartitionBackfill":
            raise GraphQLError(f"backfill {backfill_id}: {d}")
        for r in d.get("runs") or []:
            r["tags"] = {t["key"]: t["value"] for t in r["tags"]}
        return d

    def wait_backfill(self, backfill_id: str, timeout: float, check=None) -> dict:
        done = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
        state: dict = {}

        def finished():
            state.update(self.backfill(backfill_id))
            return state["status"] in done

        wait_for(finished, timeout, f"backfill {backfill_id}", interval=1.0, check=check)
        return state

    def runs(self, limit: int = 200, statuses: Iterable[str] | None = None) -> list[dict]:
        filt = {"statuses": list(statuses)} if statuses else {}
        d = self.gql(
            """query($f: RunsFilter, $n: Int) { runsOrError(filter: $f, limit: $n) {
                 __typename ... on Runs { results { runId status jobName creationTime startTime endTime
                   tags { key value } } } ... on PythonError { message } } }""",
            {"f": filt, "n": limit},
        )["runsOrError"]
        if d["__typename"] != "Runs":
            raise GraphQLError(str(d))
        for r in d["results"]:
            r["tags"] = {t["key"]: t["value"] for t in r["tags"]}
        return d["results"]

    def active_runs(self) -> list[dict]:
        return self.runs(statuses=ACTIVE_RUN_STATUSES)

    def backfills_in_progress(self) -> list[str]:
        """Backfills not finished yet (the automation sensor may request one; the backfill daemon turns
        it into runs on its next loop, up to 30 s later)."""
        d = self.gql(
            "{ partitionBackfillsOrError(status: REQUESTED, limit: 50) {"
            " ... on PartitionBackfills { results { id } } } }"
        )
        return [b["id"] for b in (d["partitionBackfillsOrError"].get("results") or [])]

    def wait_quiet(self, quiet_s: float, timeout: float, check=None) -> None:
        """Wait until no run has been queued or running, and no backfill requested, for ``quiet_s``
        seconds in a row."""
        deadline = time.monotonic() + timeout
        quiet_since = None
        n_before = None
        while time.monotonic() < deadline:
            if check:
                check()
            runs = self.runs(limit=500)
            now = time.monotonic()
            if any(r["status"] in ACTIVE_RUN_STATUSES for r in runs) or self.backfills_in_progress():
                quiet_since = None
            elif quiet_since is None or len(runs) != n_before:
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                return
            n_before = len(runs)
            time.sleep(0.5)
        raise TimeoutError(f"runs still active after {timeout:.0f}s")

    def settle_after_start(self, quiet_s: float, timeout: float, check=None) -> None:
        """Wait for the source sensor's first report and for whatever the automation launches from it.

        On a fresh instance the source sensor reports every shard on its first tick and the automation
        sensor may then bootstrap all shards itself. A backfill launched while that run is in flight
        overlaps it, and overlapping runs currently risk a deadlock in rag_assets.store.schema.migrate
        (reported); tests that need a quiet start call this first."""
        wait_for(
            lambda: self.sensor_ticks("source_sensor"), timeout, "the source sensor's first tick", check=check
        )
        self.wait_quiet(quiet_s=quiet_s, timeout=timeout, check=check)

    def sensor_ticks(self, name: str, location: str = "rag_assets", limit: int = 5) -> list[dict]:
        d = self.gql(
            """query($s: SensorSelector!, $n: Int) { sensorOrError(sensorSelector: $s) { __typename
                 ... on Sensor { sensorState { status ticks(limit: $n) { status timestamp skipReason } } } } }""",
            {
                "s": {
                    "repositoryLocationName": location,
                    "repositoryName": "__repository__",
                    "sensorName": name,
                },
                "n": limit,
            },
        )["sensorOrError"]
        return d.get("sensorState", {}).get("ticks", []) if d["__typename"] == "Sensor" else []


def wait_backfills(api: Dagster, ids: list[str], shards: set[str], timeout: float, check=None) -> list[dict]:
    """Wait until the runs of backfills ``ids`` materialized every shard in ``shards``; returns all runs.

    A failed run that the daemon will retry (run_retries, tag ``dagster/will_retry=true``) is not fatal:
    its retry carries the same backfill tag and is waited for. A failed run that will not be retried, or
    a failed/canceled backfill, raises RuntimeError with the run's tags."""
    state: dict = {}

    def done():
        runs = []
        for bid in ids:
            b = api.backfill(bid)
            if b["status"] in ("FAILED", "COMPLETED_FAILED", "CANCELED"):
                raise RuntimeError(f"backfill {bid} ended {b['status']}: {b['runs']}")
            runs += b["runs"] or []
        fatal = [
            r
            for r in runs
            if r["status"] == "CANCELED"
            or (r["status"] == "FAILURE" and r["tags"].get("dagster/will_retry") == "false")
        ]
        if fatal:
            raise RuntimeError(f"run failed and will not be retried: {fatal}")
        state["runs"] = runs
        ok = {p for r in runs if r["status"] == "SUCCESS" for p in run_partitions(r)}
        pending = [r for r in runs if r["status"] not in ("SUCCESS", "FAILURE")]
        return ok >= shards and not pending

    wait_for(done, timeout, f"backfills {ids}", interval=1.0, check=check)
    return state["runs"]


def run_partitions(run: dict) -> list[str]:
    """The shard keys a run covered, from its partition tags (single key or range)."""
    tags = run["tags"]
    if "dagster/partition" in tags:
        return [tags["dagster/partition"]]
    lo = tags.get("dagster/asset_partition_range_start")
    hi = tags.get("dagster/asset_partition_range_end")
    if lo is not None and hi is not None:
        return [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    return []


# ---------------------------------------------------------------------------------------------
# the index


def query_hits(settings, text: str, k: int = 5) -> list[dict]:
    """Top-k hits from the live index with ``settings`` (as ``rag-assets query`` does)."""
    from rag_assets.embedders import make_embedder
    from rag_assets.query import QueryError, search
    from rag_assets.store.db import connect, database_url

    conn = connect(database_url(settings))
    emb = make_embedder(settings)
    try:
        return search(conn, emb, text, k).as_dict()["results"]
    except QueryError:
        return []
    finally:
        emb.close()
        conn.close()


def index_digest(url: str) -> str | None:
    from rag_assets.store.db import connect
    from rag_assets.store.serving import index_digest as digest
    from rag_assets.store.serving import live_generation

    conn = connect(url)
    try:
        return digest(conn) if live_generation(conn) else None
    finally:
        conn.close()


def cli(args: list[str], env: Mapping[str, str], timeout: float = 600, cwd: Path = REPO) -> dict | str:
    """Run ``rag-assets ARGS`` in a subprocess; JSON output is parsed."""
    r = subprocess.run(
        [str(BIN / "rag-assets"), *args],
        env=dict(env),
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise RuntimeError(f"rag-assets {' '.join(args)} failed ({r.returncode}): {r.stderr[-3000:]}")
    out = r.stdout.strip()
    try:
        return json.loads(out.splitlines()[-1]) if out else ""
    except json.JSONDecodeError:
        return out


def edit_marker(path: Path, token: str) -> str:
    """Rewrite ``path`` with a short document that carries ``token``; returns the query text."""
    sentence = f"The freshness marker {token} names this edit"
    path.write_text(f"# Edited {token}\n\n{sentence}.\n", encoding="utf-8")
    return sentence


def wait_queryable(
    settings, query: str, doc_id: str, token: str, timeout: float, interval: float = 0.2, check=None
) -> float:
    """Seconds until a query returns ``doc_id`` with ``token`` in its text."""
    t0 = time.monotonic()

    def found():
        return any(h["doc_id"] == doc_id and token in h["text"] for h in query_hits(settings, query, 3))

    wait_for(found, timeout, f"{doc_id} to be queryable with {token}", interval=interval, check=check)
    return time.monotonic() - t0
