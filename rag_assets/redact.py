"""Connection strings without their secrets, for every message, log line and status output.

Why: a password reached the terminal for key=value connection strings (``host=db password=…``),
which the URL-only redaction left untouched, and for malformed URLs, whose parse errors (ours and
libpq's) quote the whole string. Here both forms are parsed; what cannot be parsed is not shown.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

UNPARSEABLE = "<a database URL that cannot be parsed; not shown>"
_SECRET_KEYS = {"password", "sslpassword", "passfile_password"}


def redact_url(url: str | None) -> str | None:
    """``url`` with its password (and password-like query parameters) replaced by ``***``."""
    if url is None:
        return None
    if "://" not in url:
        return _redact_keywords(url)
    try:
        parts = urlsplit(url)
        password = parts.password
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return UNPARSEABLE
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in _SECRET_KEYS else v) for k, v in pairs], safe="/")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _redact_keywords(conninfo: str) -> str:
    import psycopg

    try:
        d = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:
        return UNPARSEABLE
    return " ".join(f"{k}={'***' if k.lower() in _SECRET_KEYS else v}" for k, v in d.items())


def scrub(text: str, url: str | None) -> str:
    """Remove ``url``'s password from ``text`` (an error message that may quote the URL)."""
    if not url:
        return text
    secrets: list[str] = []
    try:
        if "://" in url:
            p = urlsplit(url).password
            if p:
                secrets.append(p)
        else:
            import psycopg

            d = psycopg.conninfo.conninfo_to_dict(url)
            secrets += [v for k, v in d.items() if k.lower() in _SECRET_KEYS and v]
    except Exception:  # noqa: BLE001 - unparseable: the whole URL may be quoted, hide it
        return text.replace(url, UNPARSEABLE) if url in text else text
    for s in secrets:
        text = text.replace(s, "***")
    return text.replace(url, redact_url(url) or "")
