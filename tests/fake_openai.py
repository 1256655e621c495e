"""A fault-injecting fake of the OpenAI embeddings API, on a real HTTP socket, for tests and benchmarks.

    with FakeOpenAI(dims=8) as srv:
        srv.faults.append(Fault.rate_limited(retry_after=1))   # the next request gets a 429
        emb = OpenAICompatEmbedder(srv.url, "sk-test", "fake-model")
        ...
        assert srv.request_count == 2

Vectors are deterministic (:func:`fake_vector`: sha256 of the text -> seeded normal -> unit length),
so a test can compute exactly what the client should return. Faults are consumed one per request
from ``srv.faults`` (a queue, in arrival order); when the queue is empty, ``srv.rules`` (callables
``(request_no, inputs) -> Fault | None``) are asked, which programs faults per request. ``latency_s``
delays every answer. The server records each request (:class:`Recorded`: arrival time, inputs,
headers, status, fault) and counts the maximum number of requests in flight at once.

Two server limits, checked before any queued fault is consumed, model real servers:
``max_batch_size`` refuses a request with more inputs, as HuggingFace TEI does over its
``--max-client-batch-size`` (HTTP 413, ``{"message": "batch size 64 > maximum allowed batch size 32",
"code": 413, "type": "validation"}``; ``batch_limit_status`` and ``batch_limit_message`` give other
servers' variants, e.g. 422 or 400); ``slow_above``/``slow_s`` make a request with more inputs than
``slow_above`` take ``slow_s`` seconds (set it beyond the client timeout: a small CPU model server
that cannot answer a large batch in time), after which the connection is dropped unanswered.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def fake_vector(text: str, dims: int, model: str = "") -> np.ndarray:
    """The unit float32 vector the fake server returns for ``text`` (deterministic)."""
    seed = int.from_bytes(hashlib.sha256(f"{model}\x00{text}".encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dims)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _b64(v: np.ndarray) -> str:
    """``encoding_format=base64``: little-endian float32 bytes, base64-encoded (as OpenAI does)."""
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")


def fake_token_count(text: str) -> int:
    """What the fake server reports as usage per input (roughly OpenAI's 4 characters per token)."""
    return max(1, len(text) // 4)


@dataclass
class Fault:
    """One injected misbehaviour. Build with the classmethods."""

    kind: str
    status: int = 200
    retry_after: float | str | None = None
    retry_after_ms: int | None = None
    seconds: float = 0.0
    message: str = ""
    dims: int | None = None

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = None, retry_after_ms: int | None = None) -> Fault:
        """429; ``retry_after`` in seconds, or "date:<seconds>" for an HTTP-date that far ahead."""
        return cls("status", 429, retry_after, retry_after_ms, message="Rate limit reached for requests")

    @classmethod
    def server_error(cls, status: int = 500, retry_after: float | None = None) -> Fault:
        return cls(
            "status", status, retry_after, message="The server had an error while processing your request"
        )

    @classmethod
    def error(cls, status: int, message: str) -> Fault:
        """Any status with an OpenAI-style error JSON body."""
        return cls("status", status, message=message)

    @classmethod
    def unauthorized(cls, message: str | None = None) -> Fault:
        """401 whose message echoes the key the client sent (as some gateways do), unless ``message`` is given."""
        return cls("unauthorized", 401, message=message or "")

    @classmethod
    def hang(cls, seconds: float) -> Fault:
        """Wait ``seconds`` before answering normally (longer than the client timeout -> a timeout)."""
        return cls("hang", seconds=seconds)

    @classmethod
    def malformed(cls) -> Fault:
        """200 with a body that is not JSON."""
        return cls("malformed")

    @classmethod
    def truncated(cls) -> Fault:
        """200 announcing the full Content-Length but sending half the body, then closing."""
        return cls("truncated")

    @classmethod
    def truncated_json(cls) -> Fault:
        """200 with half the JSON body and a matching Content-Length (a proxy that cut the body)."""
        return cls("truncated_json")

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without answering."""
        return cls("drop")

    @classmethod
    def too_few(cls) -> Fault:
        return cls("too_few")

    @classmethod
    def too_many(cls) -> Fault:
        return cls("too_many")

    @classmethod
    def wrong_dims(cls, dims: int) -> Fault:
        return cls("wrong_dims", dims=dims)

    @classmethod
    def nan(cls) -> Fault:
        return cls("nan")

    @classmethod
    def shuffled(cls) -> Fault:
        """A correct answer with ``data`` in random order (``index`` still right)."""
        return cls("shuffled")

    @classmethod
    def no_index(cls) -> Fault:
        """A correct answer in input order without ``index`` fields."""
        return cls("no_index")

    @classmethod
    def no_usage(cls) -> Fault:
        return cls("no_usage")

    @classmethod
    def latency(cls, seconds: float) -> Fault:
        """A correct answer after ``seconds``."""
        return cls("latency", seconds=seconds)


@dataclass
class Recorded:
    """One request as the server saw it."""

    no: int
    t: float  # time.monotonic() on arrival
    inputs: list[str]
    model: str | None
    dimensions: int | None
    authorization: str | None
    body: dict | None
    status: int = 0
    fault: str | None = None
    t_done: float = 0.0


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    max_in_flight: int = 0
    requests: list[Recorded] = field(default_factory=list)
    served: Counter = field(default_factory=Counter)


class FakeOpenAI:
    """An OpenAI-compatible ``POST /v1/embeddings`` server on 127.0.0.1 (port chosen by the OS)."""

    def __init__(
        self,
        dims: int = 8,
        *,
        latency_s: float = 0.0,
        api_key: str | None = None,
        report_usage: bool = True,
        seed: int = 0,
        constant_vectors: bool = False,
        max_batch_size: int | None = None,
        batch_limit_status: int = 413,
        batch_limit_message: str | None = None,
        slow_above: int | None = None,
        slow_s: float = 5.0,
    ):
        """``constant_vectors``: answer every text with the same pre-rendered vector (for benchmarks:
        the server then costs next to nothing, so the numbers measure the client). ``max_batch_size``,
        ``batch_limit_status``, ``batch_limit_message`` (``{n}`` and ``{max}`` are filled in),
        ``slow_above`` and ``slow_s``: see the module docstring."""
        self.dims = dims
        self.latency_s = latency_s
        self.api_key = api_key  # when set, other bearer tokens get a 401
        self.report_usage = report_usage
        self.constant_vectors = constant_vectors
        self.max_batch_size = max_batch_size
        self.batch_limit_status = batch_limit_status
        self.batch_limit_message = batch_limit_message
        self.slow_above = slow_above
        self.slow_s = slow_s
        self._constant_json: dict[tuple[int, bool], str] = {}
        self.faults: deque[Fault] = deque()
        self.rules: list[Callable[[int, list[str]], Fault | None]] = []
        self._state = _State()
        self._closing = threading.Event()
        self._random = random.Random(seed)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-openai", daemon=True
        )
        self._thread.start()
        # A new server is a new endpoint, even on a port an earlier one used: the client must not
        # start from a batch size limit it learned from that one.
        from rag_assets.embedders.batch_limit import forget_batch_size_limits

        forget_batch_size_limits(self.url)
        return self

    def close(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The base URL (``.../v1``) to give the client."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- what happened -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        with self._state.lock:
            return list(self._state.requests)

    @property
    def request_count(self) -> int:
        with self._state.lock:
            return len(self._state.requests)

    @property
    def max_in_flight(self) -> int:
        with self._state.lock:
            return self._state.max_in_flight

    def batch_sizes(self) -> list[int]:
        """The number of inputs of each request, in arrival order."""
        with self._state.lock:
            return [len(r.inputs) for r in self._state.requests]

    def served_counts(self) -> Counter:
        """How many times each input text was answered with a correct (fault-free) embedding."""
        with self._state.lock:
            return Counter(self._state.served)

    def reset_counters(self) -> None:
        with self._state.lock:
            self._state.requests.clear()
            self._state.served.clear()
            self._state.max_in_flight = self._state.in_flight

    def vector(self, text: str, dims: int | None = None, model: str = "") -> np.ndarray:
        return fake_vector(text, dims or self.dims, model)

    # -- request handling (called from handler threads) --------------------------------------------

    def _next_fault(self, no: int, inputs: list[str]) -> Fault | None:
        try:
            return self.faults.popleft()
        except IndexError:
            pass
        for rule in list(self.rules):
            fault = rule(no, inputs)
            if fault is not None:
                return fault
        return None

    def _enter(self, rec: Recorded) -> None:
        with self._state.lock:
            rec.no = len(self._state.requests)
            self._state.requests.append(rec)
            self._state.in_flight += 1
            self._state.max_in_flight = max(self._state.max_in_flight, self._state.in_flight)

    def _leave(self, rec: Recorded, status: int, fault: Fault | None, served: bool) -> None:
        with self._state.lock:
            self._state.in_flight -= 1
            rec.status = status
            rec.fault = fault.kind if fault else None
            rec.t_done = time.monotonic()
            if served:
                self._state.served.update(rec.inputs)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._closing.wait(seconds)

    def _constant(self, dims: int, b64: bool) -> str:
        with self._state.lock:
            if (dims, b64) not in self._constant_json:
                v = fake_vector("constant", dims)
                self._constant_json[(dims, b64)] = json.dumps(_b64(v) if b64 else v.tolist())
            return self._constant_json[(dims, b64)]

    def _shuffle(self, items: list) -> None:
        with self._state.lock:
            self._random.shuffle(items)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that time out and hang up are part of the tests; stay quiet about broken pipes.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def _tei_error_body(message: str, status: int) -> bytes:
    """TEI's OpenAI-compatible error body (``OpenAICompatErrorResponse``): no ``error`` object."""
    return json.dumps({"message": message, "code": status, "type": "validation"}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real API
    server_fake: FakeOpenAI

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence the default logging
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

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        fake = self.server_fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        inputs = body.get("input") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        rec = Recorded(
            no=-1,
            t=time.monotonic(),
            inputs=list(inputs) if isinstance(inputs, list) else [],
            model=body.get("model") if isinstance(body, dict) else None,
            dimensions=body.get("dimensions") if isinstance(body, dict) else None,
            authorization=self.headers.get("Authorization"),
            body=body if isinstance(body, dict) else None,
        )
        fake._enter(rec)
        status, fault, served, write = 500, None, False, None
        try:
            status, fault, served, write = self._answer(fake, rec, body)
        finally:
            # Book-keeping before the answer leaves: once the client has it, it may start its next
            # request at once, and the counters must already say this one is done.
            fake._leave(rec, status, fault, served)
        if write is not None:
            write()

    def _answer(
        self, fake: FakeOpenAI, rec: Recorded, body: object
    ) -> tuple[int, Fault | None, bool, Callable[[], None] | None]:
        """Decide the answer (and sleep any latency); return it with the function that sends it."""
        if self.path.rstrip("/") not in ("/v1/embeddings", "/embeddings"):
            return 404, None, False, lambda: self._send(404, _error_body(f"Invalid URL (POST {self.path})"))
        auth = rec.authorization or ""
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else auth
        if fake.api_key is not None and token != fake.api_key:
            msg = (
                f"Incorrect API key provided: {token}. You can find your API key at https://example.invalid."
            )
            return (
                401,
                Fault.unauthorized(msg),
                False,
                lambda: self._send(401, _error_body(msg, code="invalid_api_key")),
            )
        if not isinstance(body, dict) or not isinstance(body.get("input"), list | str) or not rec.inputs:
            return 400, None, False, lambda: self._send(400, _error_body("'input' is a required property"))
        if any(not isinstance(t, str) or not t for t in rec.inputs):
            return (
                400,
                None,
                False,
                lambda: self._send(
                    400, _error_body("'$.input' is invalid: inputs must be non-empty strings")
                ),
            )

        n = len(rec.inputs)
        if fake.max_batch_size is not None and n > fake.max_batch_size:
            template = fake.batch_limit_message or "batch size {n} > maximum allowed batch size {max}"
            msg = template.format(n=n, max=fake.max_batch_size)
            status = fake.batch_limit_status
            return (
                status,
                Fault("batch_too_large", status, message=msg),
                False,
                lambda: self._send(status, _tei_error_body(msg, status)),
            )
        if fake.slow_above is not None and n > fake.slow_above:
            # Still computing when the client gives up; the answer never arrives.
            rec.fault = "slow"  # visible while it sleeps
            fake._sleep(fake.slow_s)
            self.close_connection = True
            return 0, Fault("slow", seconds=fake.slow_s), False, None

        fault = fake._next_fault(rec.no, rec.inputs)
        fake._sleep(fake.latency_s)
        kind = fault.kind if fault else None

        if kind == "status":
            assert fault is not None
            headers: dict[str, str] = {}
            if isinstance(fault.retry_after, str) and fault.retry_after.startswith("date:"):
                when = time.time() + float(fault.retry_after[5:])
                headers["Retry-After"] = email.utils.formatdate(when, usegmt=True)
            elif fault.retry_after is not None:
                headers["Retry-After"] = (
                    f"{fault.retry_after:g}"
                    if isinstance(fault.retry_after, float | int)
                    else str(fault.retry_after)
                )
            if fault.retry_after_ms is not None:
                headers["retry-after-ms"] = str(fault.retry_after_ms)
            type_ = "requests" if fault.status == 429 else "server_error"
            return (
                fault.status,
                fault,
                False,
                lambda: self._send(fault.status, _error_body(fault.message, type_), headers),
            )
        if kind == "unauthorized":
            assert fault is not None
            msg = fault.message or f"Incorrect API key provided: {token}."
            return 401, fault, False, lambda: self._send(401, _error_body(msg, code="invalid_api_key"))
        if kind == "drop":
            self.close_connection = True
            return 0, fault, False, None
        if kind == "hang":  # an upstream that never answers: the client times out first
            assert fault is not None
            fake._sleep(fault.seconds)
            self.close_connection = True
            return 0, fault, False, None
        if kind == "latency":
            assert fault is not None
            fake._sleep(fault.seconds)

        model = str(body.get("model") or "")
        dims = int(body.get("dimensions") or fake.dims)
        b64 = body.get("encoding_format") == "base64"
        if fake.constant_vectors and kind in (None, "latency"):
            emb = fake._constant(dims, b64)
            items = ",".join(
                f'{{"object":"embedding","index":{i},"embedding":{emb}}}' for i in range(len(rec.inputs))
            )
            tokens = sum(fake_token_count(t) for t in rec.inputs)
            usage = (
                f',"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}' if fake.report_usage else ""
            )
            fast = f'{{"object":"list","data":[{items}],"model":{json.dumps(model)}{usage}}}'.encode()
            return 200, fault, True, lambda: self._send(200, fast)
        if kind == "wrong_dims":
            assert fault is not None
            dims = fault.dims or dims + 1
        data = [
            {"object": "embedding", "index": i, "embedding": fake_vector(t, dims, model).tolist()}
            for i, t in enumerate(rec.inputs)
        ]
        if b64 and kind not in ("nan",):
            for item in data:
                item["embedding"] = _b64(np.asarray(item["embedding"], dtype=np.float32))
        if kind == "too_few":
            data = data[:-1]
        elif kind == "too_many":
            data.append({"object": "embedding", "index": len(data), "embedding": data[0]["embedding"]})
        elif kind == "nan":
            data[0]["embedding"][0] = float("nan")
        elif kind == "shuffled":
            fake._shuffle(data)
        elif kind == "no_index":
            for item in data:
                del item["index"]
        tokens = sum(fake_token_count(t) for t in rec.inputs)
        answer: dict[str, object] = {"object": "list", "data": data, "model": model}
        if fake.report_usage and kind != "no_usage":
            answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        payload = json.dumps(answer).encode()  # NaN is written as the (non-standard) NaN literal

        if kind == "malformed":
            return 200, fault, False, lambda: self._send(200, b"<html><body>502 Bad Gateway</body></html>")
        if kind == "truncated":

            def send_truncated() -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True

            return 200, fault, False, send_truncated
        if kind == "truncated_json":
            return 200, fault, False, lambda: self._send(200, payload[: len(payload) // 2])
        ok = kind in (None, "shuffled", "no_index", "no_usage", "latency")
        return 200, fault, ok, lambda: self._send(200, payload)
