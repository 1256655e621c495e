"""Document metadata: the strict JSON rules every document's metadata passes, and its canonical keys.

Metadata ends up in PostgreSQL ``jsonb`` and in every query hit, so it must be JSON that reads back
exactly as written (no NaN, no NUL, no lone surrogate, bounded depth and size), whether it came from
front matter, an object's user metadata or a webhook's ``metadata`` field.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

from rag_assets.front_matter import INT_LIMIT as _INT_LIMIT
from rag_assets.front_matter import MAX_METADATA_DEPTH
from rag_assets.front_matter import Unusable as _Unusable
from rag_assets.front_matter import shown as _shown
from rag_assets.sources.base import DocumentError

RESERVED_META = ("path", "size", "mtime")
DEFAULT_MAX_METADATA_BYTES = 64 * 1024  # RAG_MAX_METADATA_BYTES: canonical JSON of one document's metadata
MAX_DERIVED_TITLE_CHARS = 1000  # a title taken from the body's first heading is cut to this

_MD_HEADING_RE = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
_RST_ADORNMENT = r"""[=\-`:'"~^_*+#<>.!$%&(),/;?@\[\]\\{|}]"""
_RST_TITLE_RE = re.compile(
    rf"^(?:({_RST_ADORNMENT})\1{{2,}}[ \t]*\n)?[ \t]*(\S[^\n]*?)[ \t]*\n({_RST_ADORNMENT})\3{{2,}}[ \t]*$",
    re.M,
)
_SETEXT_RE = re.compile(r"^(\S[^\n]*?)[ \t]*\n(=+|-+)[ \t]*$", re.M)

__all__ = [
    "DEFAULT_MAX_METADATA_BYTES",
    "MAX_DERIVED_TITLE_CHARS",
    "MAX_METADATA_DEPTH",
    "RESERVED_META",
    "build_metadata",
    "first_heading",
]


def _check_string(s: str, what: str) -> None:
    if "\x00" in s:
        raise _Unusable(f"{what} contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Unusable(
            f"{what} contains a lone surrogate (\\u{ord(s[e.start]):04x}), which is not valid Unicode"
        ) from None


def _path_text(path: list) -> str:
    if not path:
        return "metadata"
    return "metadata" + "".join(f"[{k}]" if isinstance(k, int) else f"['{_shown(k, 40)}']" for k in path)


def _json_safe(value: object, max_bytes: int) -> dict:
    """A copy of ``value`` made only of JSON values that PostgreSQL jsonb stores and returns as
    they were, or ``_Unusable`` naming the offending value.

    Strict rules: strings and keys are valid Unicode without NUL; numbers are finite and integers
    within a double's range; dates become ISO 8601 strings; sets become sorted lists; containers nest at most
    ``MAX_METADATA_DEPTH`` deep and never contain themselves; keys are strings. The copy is
    abandoned as soon as a lower bound of its JSON size passes ``max_bytes``, so a structure
    that shares sub-structures (YAML aliases) is never expanded beyond the bound.
    """
    budget = [max_bytes]
    active: set[int] = set()

    def spend(n: int) -> None:
        budget[0] -= n
        if budget[0] < 0:
            raise _Unusable(f"metadata is larger than RAG_MAX_METADATA_BYTES={max_bytes} bytes as JSON")

    def conv(v: object, path: list, depth: int) -> object:
        if isinstance(v, str):
            _check_string(v, _path_text(path))
            spend(len(v) + 2)
            return v
        if v is None or isinstance(v, bool):
            spend(4)
            return v
        if isinstance(v, int):
            if not -_INT_LIMIT < v < _INT_LIMIT:
                raise _Unusable(f"{_path_text(path)} is an integer too large for metadata (over 2**1024)")
            spend(1)
            return v
        if isinstance(v, float):
            if not math.isfinite(v):
                raise _Unusable(f"{_path_text(path)} is {v!r}, which is not a JSON number")
            spend(1)
            return v
        if isinstance(v, dt.datetime | dt.date):
            spend(12)
            return v.isoformat()
        if not isinstance(v, dict | list | tuple | set | frozenset):
            raise _Unusable(f"{_path_text(path)} is a {type(v).__name__}, which metadata cannot hold")
        if depth >= MAX_METADATA_DEPTH:
            raise _Unusable(f"{_path_text(path)} is nested deeper than {MAX_METADATA_DEPTH} levels")
        if id(v) in active:
            raise _Unusable(f"{_path_text(path)} contains itself (a recursive alias)")
        active.add(id(v))
        spend(2)
        try:
            if isinstance(v, dict):
                out: dict = {}
                for k, x in v.items():
                    if not isinstance(k, str):
                        raise _Unusable(f"{_path_text(path)} has a non-string key {_shown(k, 40)}")
                    _check_string(k, f"a key in {_path_text(path)}")
                    spend(len(k) + 3)  # "key":
                    out[k] = conv(x, [*path, k], depth + 1)
                spend(max(len(out) - 1, 0))  # commas
                return out
            items = [conv(x, [*path, i], depth + 1) for i, x in enumerate(v)]
            spend(max(len(items) - 1, 0))
            if isinstance(v, set | frozenset):  # no order of its own: sort, so equal sets hash equal
                items.sort(key=lambda x: json.dumps(x, sort_keys=True, ensure_ascii=False))
            return items
        finally:
            active.discard(id(v))

    return conv(value, [], -1)  # type: ignore[return-value]


def _checked_metadata(doc_id: str, meta: dict, max_bytes: int) -> dict:
    """The final gate: ``meta`` as strict JSON (no NaN/Infinity, valid UTF-8) that reads back
    equal, within ``max_bytes``. What passes here is what PostgreSQL jsonb accepts."""
    try:
        text = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        raw = text.encode("utf-8")
        same = json.loads(text) == meta
    except (ValueError, TypeError, RecursionError) as e:
        raise DocumentError(doc_id, f"metadata is not valid JSON: {_shown(str(e), 200)}") from None
    if not same:
        raise DocumentError(doc_id, "metadata does not read back unchanged from JSON")
    if len(raw) > max_bytes:
        raise DocumentError(
            doc_id, f"metadata is {len(raw)} bytes as JSON, more than RAG_MAX_METADATA_BYTES={max_bytes}"
        )
    return meta


def first_heading(text: str) -> str | None:
    """The document title: the earliest Markdown ATX, setext or reST section title."""
    head = text[:20000]
    best: tuple[int, str] | None = None
    for rx, group in ((_MD_HEADING_RE, 1), (_RST_TITLE_RE, 2), (_SETEXT_RE, 1)):
        m = rx.search(head)
        if m and (best is None or m.start() < best[0]):
            title = m.group(group).strip()
            if title:
                best = (m.start(), title)
    return best[1] if best else None


def build_metadata(
    doc_id: str, front: dict, body: str, size: int, mtime_ns: int, source_meta: dict | None = None
) -> dict:
    """Canonical document metadata: path, title, size, mtime, the source's own keys, then front
    matter keys. ``path``, ``size``, ``mtime`` and every key in ``source_meta`` (an object's ``uri``,
    ``etag``...) cannot be overridden by front matter: the fast path and the citations rely on them."""
    reserved = set(RESERVED_META) | set(source_meta or ())
    meta: dict = {k: v for k, v in front.items() if k not in reserved}
    title = front.get("title")
    if not isinstance(title, str) or not title.strip():
        title = first_heading(body) or Path(doc_id).stem
        if len(title) > MAX_DERIVED_TITLE_CHARS:  # a giant heading line is not worth refusing a document
            title = title[: MAX_DERIVED_TITLE_CHARS - 1] + "…"
    meta["title"] = title
    meta["path"] = doc_id
    meta["size"] = size
    meta["mtime"] = dt.datetime.fromtimestamp(mtime_ns / 1e9, tz=dt.UTC).isoformat()
    if source_meta:
        meta.update(source_meta)
    return meta
