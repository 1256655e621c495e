"""Staying within a provider's rate limits, and waiting well when it says no.

Budget
    Requests-per-minute and tokens-per-minute budgets are enforced by a :class:`RateLimiter` shared
    by every embedder in the process that talks to the same ``(base_url, model)`` (see
    :func:`shared_limiter`); when several instances configure different budgets the strictest wins.
    The limiter is a GCRA (a token bucket without burst): requests are spaced ``60/rpm`` s apart and
    a request of ``t`` tokens advances the token schedule by ``60*t/tpm`` s, so over any window of
    ``W`` seconds the process sends at most ``rpm*W/60 + 1`` requests and ``tpm*W/60`` tokens plus
    one request's worth. A ``Retry-After`` answer pauses the whole limiter, so every concurrent
    batch backs off, not just the one that was throttled.

Retries
    Waits between attempts are exponential backoff with full jitter (:class:`Backoff`:
    ``uniform(0, min(max_s, base_s * 2**k))``); a ``Retry-After`` (seconds or HTTP date) or
    ``retry-after-ms`` header (:func:`parse_retry_after`) sets a floor on the wait. A batch, and the
    smaller batches it may be split into, share one :class:`RetryBudget` of ``max_retry_s``
    seconds from the first attempt.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


class RateLimiter:
    """A process-wide requests-per-minute and tokens-per-minute budget (GCRA, no burst).

    ``acquire(tokens)`` blocks until the request may be sent and reserves its slot; callers are
    served in the order they asked. ``pause(seconds)`` holds everyone back (a provider's
    ``Retry-After``). Thread-safe; share one instance between all clients of one provider budget.
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._lock = threading.Lock()
        self._clock = clock
        self.rpm = rpm or None
        self.tpm = tpm or None
        self._next_request = 0.0  # earliest time the next request may go (theoretical arrival time)
        self._next_token = 0.0
        self._paused_until = 0.0

    def __repr__(self) -> str:
        return f"RateLimiter(rpm={self.rpm}, tpm={self.tpm})"

    def tighten(self, rpm: float | None, tpm: float | None) -> None:
        """Adopt the stricter of the current and the given budgets (None = no limit)."""
        with self._lock:
            if rpm:
                self.rpm = min(self.rpm, rpm) if self.rpm else rpm
            if tpm:
                self.tpm = min(self.tpm, tpm) if self.tpm else tpm

    def pause(self, seconds: float) -> None:
        """No request may start for ``seconds`` from now (extends, never shortens, a pause)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    def acquire(self, tokens: int = 0, cancel: threading.Event | None = None) -> float:
        """Wait for a slot for one request of ``tokens`` tokens; return the seconds waited.

        Returns early (without sending being safe) only when ``cancel`` is set; callers check it.
        """
        start = self._clock()
        with self._lock:
            now = self._clock()
            at = max(now, self._paused_until)
            if self.rpm:
                at = max(at, self._next_request)
                self._next_request = at + 60.0 / self.rpm
            if self.tpm:
                at = max(at, self._next_token)
                # A request bigger than a minute's budget still goes, it just pushes the next ones back.
                self._next_token = at + 60.0 * max(0, tokens) / self.tpm
        slept = False
        while True:
            now = self._clock()
            with self._lock:
                at = max(at, self._paused_until)
            delay = at - now
            if delay <= 0:
                return self._clock() - start if slept else 0.0
            slept = True
            if cancel is not None:
                if cancel.wait(delay):
                    return self._clock() - start
            else:
                time.sleep(delay)


_LIMITERS: dict[tuple[str, str], RateLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def shared_limiter(
    base_url: str, model: str, rpm: float | None = None, tpm: float | None = None
) -> RateLimiter:
    """The process-wide limiter for ``(base_url, model)``; the strictest configured budget wins."""
    key = (base_url.rstrip("/").lower(), model)
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = _LIMITERS[key] = RateLimiter(rpm, tpm)
            return limiter
    limiter.tighten(rpm, tpm)
    return limiter

def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date); None if absent."""
    waits: list[float] = []
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                waits.append(max(0.0, value))
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        ra = ra.strip()
        try:
            value = float(ra)
            if math.isfinite(value):
                waits.append(max(0.0, value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(ra)
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None and when.tzinfo is not None:
                waits.append(max(0.0, when.timestamp() - (time.time() if now is None else now)))
    return max(waits) if waits else None


class Backoff:
    """Exponential backoff with full jitter: attempt ``k`` waits ``uniform(0, min(max_s, base_s * 2**(k-1)))``.

    Full jitter spreads the retries of many concurrent batches instead of sending them back in
    lockstep. Thread-safe; ``seed`` makes the sequence reproducible (tests).
    """

    def __init__(self, base_s: float = 0.5, max_s: float = 30.0, seed: int | None = None):
        self.base_s = base_s
        self.max_s = max_s
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (1 for the first retry)."""
        cap = min(self.max_s, self.base_s * (2 ** min(attempt - 1, 30)))
        with self._lock:
            return self._random.uniform(0.0, cap)


@dataclass
class RetryBudget:
    """The retry budget of a batch and of the pieces it is split into, until one is answered."""

    start: float
    deadline: float
    attempts: int = 0  # failed attempts so far, over the batch and its pieces

    @classmethod
    def starting_now(cls, max_retry_s: float) -> RetryBudget:
        now = time.monotonic()
        return cls(now, now + max_retry_s)
