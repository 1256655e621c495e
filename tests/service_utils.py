"""Helpers for the service tests and benchmarks: real servers (thread or process), signed events,
and a concurrent sender that retries until every event is acknowledged."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg

from rag_assets.service.signatures import sign_sha256, standard_headers

ROOT = Path(__file__).resolve().parents[1]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rfc3339(t: float | datetime | None = None) -> str:
    if t is None:
        t = time.time()
    dt = t if isinstance(t, datetime) else datetime.fromtimestamp(t, UTC)
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def event_body(
    doc_id: str,
    etype: str = "document.created",
    content: str | None = "hello",
    *,
    ts: float | datetime | str | None = None,
    metadata: dict | None = None,
    event_id: str | None = None,
) -> bytes:
    data: dict = {"doc_id": doc_id}
    if content is not None:
        data["content"] = content
    if metadata is not None:
        data["metadata"] = metadata
    obj: dict = {"type": etype, "timestamp": ts if isinstance(ts, str) else rfc3339(ts), "data": data}
    if event_id is not None:
        obj["id"] = event_id
    return json.dumps(obj).encode()


def signed_headers(secret: str | list[str], event_id: str, body: bytes, timestamp: int | None = None) -> dict:
    h = standard_headers(secret, event_id, body, timestamp)
    h["content-type"] = "application/json"
    return h


def sha256_headers(secret: str, body: bytes, header: str = "X-Hub-Signature-256") -> dict:
    return {header: sign_sha256(secret, body), "content-type": "application/json"}


def inbox_rows(db_url: str) -> list[tuple]:
    with psycopg.connect(db_url) as c:
        return c.execute(
            "SELECT event_id, event_type, doc_id, shard, source_time, content, metadata FROM inbox ORDER BY seq"
        ).fetchall()


def inbox_count(db_url: str) -> int:
    with psycopg.connect(db_url) as c:
        try:
            return c.execute("SELECT count(*) FROM inbox").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0


def db_fingerprint(db_url: str) -> tuple:
    """Everything a webhook could change: inbox, tombstones, manifest, settings (compared before/after)."""
    with psycopg.connect(db_url) as c:
        return tuple(
            c.execute(
                f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {t} t"
            ).fetchone()[0]
            for t in ("inbox", "tombstones", "manifest", "document_bodies", "settings")
        )


# --- servers --------------------------------------------------------------------------------


class ThreadServer:
    """uvicorn in a background thread of this process (fast to start; for most tests), configured
    as ``rag-assets serve`` configures it."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        from rag_assets.service.server import make_config

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the configuration `rag-assets serve` runs with (header timeout, keep-alive, limits)
        config = make_config(app, app.state.service.settings, "127.0.0.1", self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class ProcessServer:
    """``python -m rag_assets.service.server`` as a real subprocess (crash tests, benchmarks)."""

    def __init__(self, env: dict[str, str], port: int | None = None, log_path: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> ProcessServer:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rag_assets.service.server",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=out,
            stderr=out,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode} during startup")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("service did not become healthy")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ProcessServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- load -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    sent: int = 0
    accepted: set[str] = field(default_factory=set)  # ids acknowledged 202
    duplicate_acks: set[str] = field(default_factory=set)  # ids acknowledged 200 duplicate
    redeliveries: int = 0
    redelivery_acks: int = 0  # deliberate redeliveries answered 200 duplicate
    retries: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # first successful ack per event
    seconds: float = 0.0
    ack_log: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, id) per ack

    @property
    def acked(self) -> set[str]:
        return self.accepted | self.duplicate_acks


def make_events(n: int, prefix: str = "evt", content_bytes: int = 200) -> list[tuple[str, bytes]]:
    filler = ("lorem ipsum dolor sit amet " * (content_bytes // 27 + 1))[:content_bytes]
    now = time.time()
    return [
        (
            f"{prefix}-{i:06d}",
            event_body(
                f"docs/{prefix}/{i % (n // 3 + 1)}.md", "document.updated", f"{i} {filler}", ts=now + i * 1e-3
            ),
        )
        for i in range(n)
    ]


class RawHTTPConnection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: the load generator.

    httpx's async pool costs milliseconds of client CPU per request at 20 connections, which on a
    small machine measures the client, not the service. This sends one request at a time per
    connection and reads a Content-Length response (all this service sends); any error closes the
    connection and the next request reconnects.
    """

    def __init__(self, base_url: str):
        u = httpx.URL(base_url)
        self.host, self.port = u.host, u.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], timeout: float = 10.0
    ) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._post(path, body, headers), timeout)
        except BaseException:
            await self.close()
            raise

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        length, close = 0, False
        for h in header_lines:
            k, _, v = h.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
            elif k.strip().lower() == "connection" and v.strip().lower() == "close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, data


async def send_load(
    base_url: str | list[str],
    secret: str,
    events: list[tuple[str, bytes]],
    concurrency: int = 20,
    *,
    redeliver_every: int = 0,
    deadline_s: float = 120.0,
    retry_delay_s: float = 0.05,
    result: LoadResult | None = None,
) -> LoadResult:
    """Send every event, signed, from ``concurrency`` senders; retry each until it is acknowledged.

    Each sender has its own keep-alive connection. ``base_url`` may be a one-element list that the
    caller swaps (a restarted server). With ``redeliver_every`` = n, every n-th event is sent again
    after its ack and must come back 200. Signatures are made fresh for every attempt (a retry
    after minutes must not go stale).
    """
    urls = base_url if isinstance(base_url, list) else [base_url]
    res = result if result is not None else LoadResult()
    queue: asyncio.Queue[tuple[int, str, bytes]] = asyncio.Queue()
    for i, (eid, body) in enumerate(events):
        queue.put_nowait((i, eid, body))
    t_end = time.monotonic() + deadline_s

    async def post(conn: list[RawHTTPConnection], eid: str, body: bytes) -> int | None:
        res.sent += 1
        if conn[0].port != httpx.URL(urls[0]).port:
            await conn[0].close()
            conn[0] = RawHTTPConnection(urls[0])
        try:
            status, _ = await conn[0].post("/webhooks/documents", body, signed_headers(secret, eid, body))
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            res.errors += 1
            return None
        res.statuses[status] = res.statuses.get(status, 0) + 1
        return status

    async def sender() -> None:
        conn = [RawHTTPConnection(urls[0])]
        try:
            while True:
                try:
                    i, eid, body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                first = True
                while True:
                    if time.monotonic() > t_end:
                        raise TimeoutError(f"event {eid} not acknowledged before the deadline")
                    t0 = time.perf_counter()
                    status = await post(conn, eid, body)
                    if status in (200, 202):
                        res.latencies_ms.append((time.perf_counter() - t0) * 1000)
                        res.ack_log.append((time.monotonic(), eid))
                        (res.accepted if status == 202 else res.duplicate_acks).add(eid)
                        break
                    if not first or status is None or status >= 500:
                        await asyncio.sleep(retry_delay_s)
                    res.retries += 1
                    first = False
                if redeliver_every and i % redeliver_every == 0:
                    res.redeliveries += 1
                    while time.monotonic() < t_end:
                        status = await post(conn, eid, body)
                        if status in (200, 202):
                            res.redelivery_acks += status == 200
                            break
                        await asyncio.sleep(retry_delay_s)
        finally:
            await conn[0].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    res.seconds = time.perf_counter() - t0
    return res


def percentile(values: Iterable[float], q: float) -> float:
    import numpy as np

    v = list(values)
    return float(np.percentile(np.asarray(v), q)) if v else float("nan")
