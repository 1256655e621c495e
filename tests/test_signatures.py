"""Signature verification (pure): both header styles, rotation, tolerance, and the independent
``standardwebhooks`` implementation as the reference for the Standard Webhooks style."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from rag_assets.service.signatures import (
    MIN_SECRET_BYTES,
    SecretError,
    SignatureError,
    check_tolerance,
    decode_secret,
    parse_secrets,
    sign_sha256,
    sign_standard,
    standard_headers,
    verify_request,
    verify_sha256,
    verify_standard,
)

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
OTHER = "whsec_" + base64.b64encode(b"another secret of some length!!").decode()
BODY = b'{"type":"document.created","timestamp":"2026-01-02T03:04:05Z","data":{"doc_id":"a","content":"x"}}'


def _headers_from_reference(secret: str, msg_id: str, body: bytes, ts: int) -> dict[str, str]:
    sig = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, UTC), body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig}


def test_secret_decoding():
    assert decode_secret(SECRET) == b"0123456789abcdef0123456789abcdef"
    assert decode_secret("whsec_" + base64.b64encode(b"abcd").decode().rstrip("=")) == b"abcd"  # unpadded
    assert decode_secret("plain-text-secret") == b"plain-text-secret"
    assert parse_secrets(f" {SECRET} , {OTHER} ,") == (decode_secret(SECRET), decode_secret(OTHER))
    for bad in (None, "", " , ,"):
        with pytest.raises(SecretError, match="no webhook secret"):
            parse_secrets(bad)
    with pytest.raises(SecretError, match="base64"):
        decode_secret("whsec_not base64!!")
    with pytest.raises(SecretError, match="empty"):
        decode_secret("whsec_")


def test_configured_secrets_must_hold_at_least_16_bytes():
    """A 1-byte HMAC key can be brute-forced from one signed request; the receiver refuses short keys."""
    for short, n in [
        ("x", 1),
        ("fifteen-bytes!!", 15),
        ("whsec_" + base64.b64encode(b"k" * 15).decode(), 15),  # 15 bytes after base64 decoding
        ("whsec_" + base64.b64encode(b"k" * 8).decode(), 8),
    ]:
        with pytest.raises(SecretError, match=f"at least {MIN_SECRET_BYTES} bytes.*{n} byte"):
            parse_secrets(short)
        with pytest.raises(SecretError, match="secret 2 of 2"):
            parse_secrets(f"{SECRET},{short}")
    assert parse_secrets("k" * 16) == (b"k" * 16,)
    assert parse_secrets("whsec_" + base64.b64encode(b"k" * 16).decode()) == (b"k" * 16,)
    # signing helpers (clients, tests) still take any key: only what the receiver is configured with is checked
    assert sign_sha256(b"x", BODY).startswith("sha256=")


def test_reference_signature_is_accepted_and_ours_is_accepted_by_the_reference():
    ts = int(time.time())
    keys = parse_secrets(SECRET)
    ref = _headers_from_reference(SECRET, "msg_1", BODY, ts)
    v = verify_standard(keys, ref, BODY)
    assert (v.style, v.event_id, v.timestamp) == ("standard", "msg_1", ts)
    ours = standard_headers(SECRET, "msg_1", BODY, ts)
    assert ours == ref
    Webhook(SECRET).verify(BODY, ours)  # the reference accepts ours


@settings(max_examples=50, deadline=None)
@given(
    body=st.binary(max_size=300),
    msg_id=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1),
)
def test_property_reference_and_ours_agree(body, msg_id):
    ts = int(time.time())
    text = body.decode("latin-1")  # the reference signs str; latin-1 round-trips any bytes
    sig = Webhook(SECRET).sign(msg_id, datetime.fromtimestamp(ts, UTC), text)
    assert sig == sign_standard(SECRET, msg_id, ts, text.encode())
    h = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig}
    verify_standard(parse_secrets(SECRET), h, text.encode())


def test_wrong_secret_altered_body_and_altered_headers_are_rejected():
    ts = int(time.time())
    keys = parse_secrets(SECRET)
    h = standard_headers(OTHER, "msg_1", BODY, ts)
    with pytest.raises(SignatureError) as e:
        verify_standard(keys, h, BODY)
    assert e.value.reason == "bad_signature"
    good = standard_headers(SECRET, "msg_1", BODY, ts)
    with pytest.raises(SignatureError):
        verify_standard(keys, good, BODY + b" ")
    with pytest.raises(SignatureError):
        verify_standard(keys, {**good, "webhook-id": "msg_2"}, BODY)  # the id is signed
    with pytest.raises(SignatureError):
        verify_standard(keys, {**good, "webhook-timestamp": str(ts + 1)}, BODY)  # so is the time
    for missing in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        h = {k: v for k, v in good.items() if k != missing}
        with pytest.raises(SignatureError, match="missing"):
            verify_standard(keys, h, BODY)
    for bad_sig in ("v1,!!!notbase64", "v2," + good["webhook-signature"][3:], "garbage", "v1,"):
        with pytest.raises(SignatureError):
            verify_standard(keys, {**good, "webhook-signature": bad_sig}, BODY)
    for bad_ts in ("12.5", "-1", "abc", "1e9"):
        with pytest.raises(SignatureError):
            verify_standard(keys, {**good, "webhook-timestamp": bad_ts}, BODY)


def test_stale_and_future_timestamps_are_rejected_after_the_signature():
    keys = parse_secrets(SECRET)
    now = 1_800_000_000
    for ts in (now - 301, now + 301):
        h = standard_headers(SECRET, "m", BODY, ts)
        with pytest.raises(SignatureError) as e:
            verify_standard(keys, h, BODY, tolerance_s=300, now=now)
        assert e.value.reason == "stale_timestamp"
    for ts in (now - 300, now + 300):
        verify_standard(keys, standard_headers(SECRET, "m", BODY, ts), BODY, tolerance_s=300, now=now)
    # a stale request with a bad signature is a bad signature (nothing about it is trusted)
    h = standard_headers(OTHER, "m", BODY, now - 1000)
    with pytest.raises(SignatureError) as e:
        verify_standard(keys, h, BODY, now=now)
    assert e.value.reason == "bad_signature"
    with pytest.raises(SignatureError):
        check_tolerance(now - 10, 5, now)


def test_key_rotation_any_configured_secret_and_any_listed_signature():
    ts = int(time.time())
    both = parse_secrets(f"{SECRET},{OTHER}")
    only_new = parse_secrets(OTHER)
    old_signed = standard_headers(SECRET, "m", BODY, ts)
    verify_standard(both, old_signed, BODY)  # server knows old and new: old-signed passes
    with pytest.raises(SignatureError):
        verify_standard(only_new, old_signed, BODY)
    two_sigs = standard_headers([SECRET, OTHER], "m", BODY, ts)  # sender signs with both
    assert len(two_sigs["webhook-signature"].split()) == 2
    verify_standard(only_new, two_sigs, BODY)
    verify_standard(parse_secrets(SECRET), two_sigs, BODY)
    # unknown versions and garbage entries around a valid one are ignored
    mixed = {**two_sigs, "webhook-signature": "v0,abc  junk " + two_sigs["webhook-signature"]}
    verify_standard(only_new, mixed, BODY)


def test_sha256_style():
    keys = parse_secrets(SECRET)
    sig = sign_sha256(SECRET, BODY)
    assert sig == "sha256=" + hmac.new(decode_secret(SECRET), BODY, hashlib.sha256).hexdigest()
    assert verify_sha256(keys, sig, BODY).style == "sha256"
    assert verify_sha256(keys, sig.upper().replace("SHA256=", "sha256="), BODY)  # hex case-insensitive
    raw = parse_secrets("plain-secret-16by")
    assert verify_sha256(
        raw, "sha256=" + hmac.new(b"plain-secret-16by", BODY, hashlib.sha256).hexdigest(), BODY
    )
    for bad in (sign_sha256(OTHER, BODY), "sha1=" + sig[7:], "sha256=zz", "sha256=" + "0" * 64, sig[:-1]):
        with pytest.raises(SignatureError):
            verify_sha256(keys, bad, BODY)
    with pytest.raises(SignatureError):
        verify_sha256(keys, sig, BODY + b"x")


def test_verify_request_dispatch():
    keys = parse_secrets(SECRET)
    std = standard_headers(SECRET, "m", BODY)
    assert verify_request(keys, std, BODY).style == "standard"
    h = {"x-hub-signature-256": sign_sha256(SECRET, BODY), "webhook-id": "hdr-id"}
    v = verify_request(keys, h, BODY)
    assert (v.style, v.event_id) == ("sha256", "hdr-id")
    custom = {"x-signature": sign_sha256(SECRET, BODY)}
    assert verify_request(keys, custom, BODY, signature_header="X-Signature").style == "sha256"
    with pytest.raises(SignatureError, match="missing signature"):
        verify_request(keys, {}, BODY)
    with pytest.raises(SignatureError, match="missing webhook-signature"):
        verify_request(keys, {"webhook-id": "m", "webhook-timestamp": "1"}, BODY)


def test_reference_library_rejects_what_we_reject():
    """Cross-check on stale timestamps: both implementations refuse the same request."""
    ts = int(time.time()) - 3600
    h = _headers_from_reference(SECRET, "m", BODY, ts)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, h)
    with pytest.raises(SignatureError):
        verify_standard(parse_secrets(SECRET), h, BODY)
