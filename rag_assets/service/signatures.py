"""Webhook signatures: HMAC-SHA256 in the two common header styles, verified in constant time.

Pure functions (no I/O, no clock unless you pass none), so they are tested on their own and reused
by clients and benchmarks to sign what they send.

Secrets
    ``RAG_WEBHOOK_SECRET`` holds one or more secrets separated by commas, so keys can rotate: a
    request passes if it is signed by any of them. A secret that starts with ``whsec_`` is the
    Standard Webhooks form: the HMAC key is the base64 decoding of the rest. Any other secret is
    used as its raw UTF-8 bytes. Every configured key must hold at least ``MIN_SECRET_BYTES`` (16)
    bytes: a short HMAC key can be brute-forced offline from one captured signed request. The same
    key is used for both header styles, so one configured secret serves a sender of either style. (The ``standardwebhooks`` client libraries base64-decode
    every secret, prefixed or not: give those senders ``whsec_`` secrets.)

Standard Webhooks (https://www.standardwebhooks.com)
    ``webhook-id``, ``webhook-timestamp`` (integer Unix seconds) and ``webhook-signature``: one or
    more space-separated ``v1,<base64 HMAC>`` entries over ``{id}.{timestamp}.{body}``. Entries of
    other versions are ignored. The signed timestamp must lie within the tolerance of our clock
    (past or future), so a captured request cannot be replayed later.

``sha256=<hex>`` (GitHub style; header name ``RAG_WEBHOOK_SIGNATURE_HEADER``)
    HMAC of the raw body alone. Nothing outside the body is signed, so the replay window is taken
    from the body: its ``timestamp`` field (RFC 3339) is covered by the signature and must lie within
    the tolerance. A ``webhook-timestamp`` header is *not* used for this: it is unsigned, and an
    attacker replaying a captured body would simply send a fresh one. The event id, likewise, is
    the body's ``id`` field when there is one (signed), else the ``webhook-id`` header. A replay
    inside the window is harmless: the event id is the idempotency key of the inbox.

Verification order in the service: size limit → signature (over the raw bytes, before any parsing)
→ timestamp tolerance → JSON → event validation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16  # Standard Webhooks secrets are 24-64 random bytes; 16 is the floor we accept
MAX_SIGNATURES = 16  # entries in one webhook-signature header we look at (bounds the work per request)
_TIMESTAMP_RE = re.compile(r"^[0-9]{1,15}$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")


class SignatureError(Exception):
    """Verification failed. ``reason`` is the metric label: ``bad_signature`` or ``stale_timestamp``."""

    def __init__(self, message: str, reason: str = "bad_signature"):
        super().__init__(message)
        self.reason = reason


class SecretError(ValueError):
    """A configured secret cannot be used (empty, or ``whsec_`` with invalid base64)."""


@dataclass(frozen=True)
class Verified:
    """What a valid signature vouches for."""

    style: str  # "standard" | "sha256"
    event_id: str | None  # the webhook-id header (standard style; sha256 style: the header, if any)
    timestamp: int | None  # signed Unix seconds (standard style only)


def decode_secret(secret: str) -> bytes:
    """The HMAC key of one configured secret (see the module docstring)."""
    secret = secret.strip()
    if not secret:
        raise SecretError("webhook secret is empty")
    if secret.startswith(SECRET_PREFIX):
        raw = secret[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise SecretError("a whsec_ webhook secret must be base64 after the prefix") from None
        if not key:
            raise SecretError("webhook secret is empty after the whsec_ prefix")
        return key
    return secret.encode("utf-8")


def parse_secrets(value: str | None) -> tuple[bytes, ...]:
    """``RAG_WEBHOOK_SECRET`` (comma-separated) → HMAC keys.

    Raises SecretError when there are none, or when one is unusable or shorter than
    ``MIN_SECRET_BYTES`` (the message says which one, by position, never its value).
    """
    if value is None or not value.strip():
        raise SecretError("no webhook secret configured")
    parts = [p for p in (s.strip() for s in value.split(",")) if p]
    if not parts:
        raise SecretError("no webhook secret configured")
    keys = []
    for i, part in enumerate(parts, 1):
        which = f"secret {i} of {len(parts)}" if len(parts) > 1 else "the secret"
        try:
            key = decode_secret(part)
        except SecretError as e:
            raise SecretError(f"{which}: {e}") from None
        if len(key) < MIN_SECRET_BYTES:
            form = (
                "after base64 decoding of the whsec_ form" if part.startswith(SECRET_PREFIX) else "of UTF-8"
            )
            raise SecretError(
                f"{which} must hold at least {MIN_SECRET_BYTES} bytes, it has {len(key)} byte(s) {form} "
                "(generate one: whsec_ + base64 of 24 random bytes)"
            )
        keys.append(key)
    return tuple(keys)


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _header_bytes(value: str) -> bytes:
    """A header value as it was on the wire (ASGI servers decode header bytes as latin-1)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


def _keys(keys: bytes | Iterable[bytes]) -> tuple[bytes, ...]:
    return (keys,) if isinstance(keys, bytes | bytearray) else tuple(keys)


# --- signing (clients, tests, benchmarks) ---------------------------------------------------


def sign_standard(key: bytes | str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature entry. ``key`` as bytes, or a secret string (decoded)."""
    k = decode_secret(key) if isinstance(key, str) else key
    mac = _mac(k, f"{msg_id}.{timestamp}.".encode() + body)
    return "v1," + base64.b64encode(mac).decode("ascii")


def standard_headers(
    keys: bytes | str | Sequence[bytes | str], msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers, with one signature per key (for rotation)."""
    ts = int(time.time()) if timestamp is None else timestamp
    ks = [keys] if isinstance(keys, bytes | str) else list(keys)
    sig = " ".join(sign_standard(k, msg_id, ts, body) for k in ks)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig}


def sign_sha256(key: bytes | str, body: bytes) -> str:
    """``sha256=<hex>`` of the raw body."""
    k = decode_secret(key) if isinstance(key, str) else key
    return "sha256=" + hmac.new(k, body, hashlib.sha256).hexdigest()


# --- verification ---------------------------------------------------------------------------


def check_tolerance(timestamp: float, tolerance_s: float, now: float | None = None) -> None:
    """Raise ``SignatureError(reason="stale_timestamp")`` if ``timestamp`` is too old or too new."""
    now = time.time() if now is None else now
    if timestamp < now - tolerance_s:
        raise SignatureError(f"timestamp is more than {tolerance_s:g} s old", "stale_timestamp")
    if timestamp > now + tolerance_s:
        raise SignatureError(f"timestamp is more than {tolerance_s:g} s in the future", "stale_timestamp")


def verify_standard(
    keys: bytes | Iterable[bytes],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> Verified:
    """Verify Standard Webhooks headers (keys lower-case) over ``body``; signature first, then time."""
    msg_id = headers.get("webhook-id")
    ts_raw = headers.get("webhook-timestamp")
    sig_header = headers.get("webhook-signature")
    if not msg_id or not ts_raw or not sig_header:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if not _TIMESTAMP_RE.match(ts_raw.strip()):
        raise SignatureError("webhook-timestamp must be integer Unix seconds")
    ts_raw = ts_raw.strip()
    ts = int(ts_raw)
    candidates: list[bytes] = []
    for entry in sig_header.split()[:MAX_SIGNATURES]:
        version, sep, b64 = entry.partition(",")
        if not sep or version != "v1":
            continue
        try:
            candidates.append(base64.b64decode(b64, validate=True))
        except (binascii.Error, ValueError):
            continue
    signed = _header_bytes(msg_id) + b"." + ts_raw.encode("ascii") + b"." + body
    ok = False
    for k in _keys(keys):
        expected = _mac(k, signed)
        for c in candidates:
            # Every comparison is constant-time; we do not stop early on a mismatch.
            ok |= hmac.compare_digest(expected, c)
    if not ok:
        raise SignatureError("no valid v1 signature for any configured secret")
    check_tolerance(ts, tolerance_s, now)
    return Verified("standard", msg_id, ts)


def verify_sha256(keys: bytes | Iterable[bytes], header_value: str, body: bytes) -> Verified:
    """Verify a ``sha256=<hex>`` header over the raw body. The caller checks the body's timestamp."""
    algo, sep, hexsig = header_value.strip().partition("=")
    if not sep or algo.lower() != "sha256" or not _HEX_RE.match(hexsig):
        raise SignatureError("signature header must be sha256=<64 hex digits>")
    given = bytes.fromhex(hexsig)
    ok = False
    for k in _keys(keys):
        ok |= hmac.compare_digest(_mac(k, body), given)
    if not ok:
        raise SignatureError("sha256 signature does not match any configured secret")
    return Verified("sha256", None, None)


def verify_request(
    keys: bytes | Iterable[bytes],
    headers: Mapping[str, str],
    body: bytes,
    *,
    signature_header: str = "X-Hub-Signature-256",
    tolerance_s: float = 300,
    now: float | None = None,
) -> Verified:
    """Verify whichever style the request uses. ``headers`` keys must be lower-case.

    A ``webhook-signature`` header selects Standard Webhooks; otherwise the ``sha256=`` header is
    required. For the sha256 style the caller must still check the body's signed ``timestamp``
    with :func:`check_tolerance` once the body is parsed (it is not parsed here).
    """
    if headers.get("webhook-signature"):
        return verify_standard(keys, headers, body, tolerance_s=tolerance_s, now=now)
    value = headers.get(signature_header.lower())
    if value:
        verify_sha256(keys, value, body)
        return Verified("sha256", headers.get("webhook-id") or None, None)
    if headers.get("webhook-id") or headers.get("webhook-timestamp"):
        raise SignatureError("missing webhook-signature header")
    raise SignatureError(f"missing signature: send webhook-signature or {signature_header}")
