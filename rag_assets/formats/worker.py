"""Convert in a separate process with a per-document time and memory limit.

PDFium, lxml and libxml2 are native code: a pathological file can loop or allocate without end,
and nothing in Python can interrupt a thread stuck inside them. A :class:`ConversionWorker` keeps
one child process (started once, reused for every document); a conversion that runs past
``limits.timeout_s`` kills the child (the next document starts a new one) and is reported as
TIMEOUT, a child that dies (a native crash) as CRASHED, and the child's address space is capped at
``limits.memory_mb`` so an allocation bomb is a MemoryError (TOO_LARGE), not a swapping machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
from multiprocessing.connection import Connection

from rag_assets.formats.conversion import Conversion
from rag_assets.formats.errors import CRASHED, TIMEOUT, FormatError
from rag_assets.formats.limits import FormatLimits


def _serve(conn: Connection, memory_mb: int) -> None:
    # openpyxl imports numpy, whose OpenBLAS reserves buffers per CPU core: on a many-core host that
    # alone would exceed the address-space limit. The worker converts one document at a time.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from rag_assets.formats.registry import convert

    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        doc_id, fmt, limits = request
        data = conn.recv_bytes()
        try:
            conn.send(("ok", convert(doc_id, data, fmt, limits)))
        except FormatError as e:
            conn.send(("error", e))


class ConversionWorker:
    """``with ConversionWorker(limits) as w: w.convert(doc_id, data, fmt)``; not thread-safe (one per thread)."""

    def __init__(self, limits: FormatLimits | None = None):
        self.limits = limits or FormatLimits()
        self._ctx = mp.get_context("spawn")  # no fork of a threaded parent (Dagster, psycopg pools)
        self._proc = None
        self._conn: Connection | None = None
        self.started = 0  # child processes started (1 unless conversions timed out or crashed)

    def __enter__(self) -> ConversionWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure(self) -> Connection:
        if self._proc is None or not self._proc.is_alive():
            self._stop()
            parent, child = self._ctx.Pipe()
            self._proc = self._ctx.Process(target=_serve, args=(child, self.limits.memory_mb), daemon=True)
            self._proc.start()
            child.close()
            self._conn = parent
            self.started += 1
        assert self._conn is not None
        return self._conn

    def convert(self, doc_id: str, data: bytes, fmt: str) -> Conversion:
        """Like :func:`rag_assets.formats.convert`, bounded by ``limits.timeout_s`` and ``memory_mb``."""
        conn = self._ensure()
        try:
            conn.send((doc_id, fmt, self.limits))
            conn.send_bytes(data)
            ready = conn.poll(self.limits.timeout_s)
            if not ready:
                self._stop()
                raise FormatError(
                    doc_id, TIMEOUT, f"conversion took longer than {self.limits.timeout_s:g} s (RAG_FORMAT_TIMEOUT_S)"
                )
            status, value = conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            if self._proc is not None:
                self._proc.join(5)
            code = self._proc.exitcode if self._proc is not None else None
            self._stop()
            raise FormatError(doc_id, CRASHED, f"the converter process died (exit code {code})") from None
        if status == "error":
            raise value
        return value

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
            self._proc = None

    def close(self) -> None:
        self._stop()
