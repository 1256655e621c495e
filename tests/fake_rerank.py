"""A fault-injecting rerank server on a real HTTP socket (127.0.0.1), for tests and benchmarks.

    with FakeRerank() as srv:
        srv.faults.append(RerankFault.status(500))      # the next request gets a 500
        r = HttpReranker(srv.url, "fake-rerank")
        ...

It speaks the three shapes :mod:`rag_assets.rerank.protocol` sends, told apart by the request:
``texts`` (TEI: answers a bare list of ``{index, score}``), ``top_k`` (Voyage: ``{"data": [...]}``),
else Cohere's (``{"results": [{index, relevance_score}]}``). The score of a document is a
deterministic relevance (:func:`fake_relevance`: the share of the query's words it contains, a
little less for longer documents), so a test knows the right order. Faults are consumed one per
request from ``srv.faults``; ``latency_s`` delays every answer. Every request is recorded
(path, body, Authorization header, status, fault).
"""

from __future__ import annotations

import email.utils
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_WORD = re.compile(r"\w+")


def fake_relevance(query: str, document: str) -> float:
    """The share of the query's distinct words found in the document, minus a small length penalty."""
    q = set(_WORD.findall(query.lower()))
    d = _WORD.findall(document.lower())
    if not q:
        return 0.0
    overlap = len(q & set(d)) / len(q)
    return round(overlap - len(d) / 1e6, 9)


@dataclass
class RerankFault:
    kind: str
    status: int = 200
    retry_after: float | str | None = None
    seconds: float = 0.0
    message: str = ""

    @classmethod
    def status_(cls, status: int, retry_after: float | str | None = None, message: str = "") -> RerankFault:
        """Any status with an error body; ``retry_after`` seconds, or "date:<seconds>" for an HTTP date."""
        return cls("status", status, retry_after, message=message or f"injected HTTP {status}")

    @classmethod
    def malformed(cls) -> RerankFault:
        """200 with a body that is not JSON."""
        return cls("malformed")

    @classmethod
    def out_of_range(cls) -> RerankFault:
        """A correct answer but one index beyond the documents sent."""
        return cls("out_of_range")

    @classmethod
    def duplicate(cls) -> RerankFault:
        """A correct answer with the first result repeated in place of the last."""
        return cls("duplicate")

    @classmethod
    def too_few(cls) -> RerankFault:
        return cls("too_few")

    @classmethod
    def hang(cls, seconds: float) -> RerankFault:
        """Answer correctly after ``seconds`` (beyond the client's timeout: a timeout)."""
        return cls("hang", seconds=seconds)


@dataclass
class RerankRequest:
    path: str
    body: dict | None
    authorization: str | None
    t: float
    status: int = 0
    fault: str | None = None


class FakeRerank:
    def __init__(self, *, latency_s: float = 0.0, api_key: str | None = None):
        self.latency_s = latency_s
        self.api_key = api_key
        self.faults: deque[RerankFault] = deque()
        self._lock = threading.Lock()
        self._requests: list[RerankRequest] = []
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> FakeRerank:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-rerank", daemon=True).start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeRerank:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The base URL (requests go to ``{url}/rerank``)."""
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def requests(self) -> list[RerankRequest]:
        with self._lock:
            return list(self._requests)

    def _next_fault(self) -> RerankFault | None:
        try:
            return self.faults.popleft()
        except IndexError:
            return None


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body leave in two writes: with Nagle's algorithm on, the body waits for the
    # client's delayed ACK (~40 ms on Linux), which would be measured as rerank latency
    disable_nagle_algorithm = True
    server_fake: FakeRerank

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def do_POST(self) -> None:  # noqa: N802
        fake = self.server_fake
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        rec = RerankRequest(self.path, body if isinstance(body, dict) else None, self.headers.get("Authorization"),
                            time.monotonic())
        with fake._lock:
            fake._requests.append(rec)
        status, fault = self._answer(fake, rec)
        rec.status, rec.fault = status, fault

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> int:
        self._send(status, json.dumps({"message": message}).encode(), headers)
        return status

    def _answer(self, fake: FakeRerank, rec: RerankRequest) -> tuple[int, str | None]:
        if self.path.rstrip("/") != "/v1/rerank":
            return self._error(404, f"no route POST {self.path}"), None
        token = (rec.authorization or "").removeprefix("Bearer ")
        if fake.api_key is not None and token != fake.api_key:
            return self._error(401, f"invalid api key {token}"), None
        body = rec.body
        if body is None or not isinstance(body.get("query"), str):
            return self._error(422, "query is required"), None
        tei = "texts" in body
        docs = body.get("texts" if tei else "documents")
        if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
            return self._error(422, "documents must be a non-empty list of strings"), None
        top = len(docs) if tei else int(body.get("top_k" if "top_k" in body else "top_n") or len(docs))
        fault = fake._next_fault()
        kind = fault.kind if fault else None
        if fake.latency_s:
            fake._closing.wait(fake.latency_s)
        if kind == "hang":
            fake._closing.wait(fault.seconds)
        if kind == "status":
            headers = {}
            if isinstance(fault.retry_after, str) and fault.retry_after.startswith("date:"):
                headers["Retry-After"] = email.utils.formatdate(time.time() + float(fault.retry_after[5:]), usegmt=True)
            elif fault.retry_after is not None:
                headers["Retry-After"] = str(fault.retry_after)
            return self._error(fault.status, fault.message, headers), kind
        if kind == "malformed":
            self._send(200, b'{"results": [{"index": 0, "relevance_')
            return 200, kind
        scored = sorted(
            ((i, fake_relevance(body["query"], d)) for i, d in enumerate(docs)), key=lambda t: (-t[1], t[0])
        )[: max(1, min(top, len(docs)))]
        if kind == "out_of_range":
            scored[-1] = (len(docs) + 3, scored[-1][1])
        elif kind == "duplicate" and len(scored) > 1:
            scored[-1] = scored[0]
        elif kind == "too_few":
            scored = scored[: max(0, len(scored) - 1)]
        if tei:
            out: object = [{"index": i, "score": s} for i, s in scored]
        else:
            items = [{"index": i, "relevance_score": s} for i, s in scored]
            out = {"object": "list", "data": items, "model": body.get("model")} if "top_k" in body else {
                "id": "fake", "results": items, "meta": {"billed_units": {"search_units": 1}}}
        self._send(200, json.dumps(out).encode())
        return 200, kind
