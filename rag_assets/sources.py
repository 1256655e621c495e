"""Document sources and normalisation.

A source answers two questions cheaply and one expensively:

* ``scan()`` — which documents exist, with ``(size, mtime_ns)`` from one ``stat`` each. This is the
  fast path: like git's index, a document whose stat is unchanged is not read again.
* ``read(doc_id)`` — the normalised text and metadata of one document, or a ``DocumentError`` that
  names it. Bad input (binary, undecodable, too large, broken front matter, metadata JSON cannot
  hold as it is or larger than ``RAG_MAX_METADATA_BYTES``) never stops a run.

doc_id is the POSIX path relative to the folder root, so ids are stable across machines.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import math
import os
import re
import stat as stat_mod  # noqa: F401 - S_ISREG in read()
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from wcmatch import glob as wcglob

from rag_assets.manifest import content_hash, meta_hash

RESERVED_META = ("path", "size", "mtime")
_FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\n(.*?\n)?(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.S)
_MD_HEADING_RE = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
_RST_ADORNMENT = r"""[=\-`:'"~^_*+#<>.!$%&(),/;?@\[\]\\{|}]"""
_RST_TITLE_RE = re.compile(
    rf"^(?:({_RST_ADORNMENT})\1{{2,}}[ \t]*\n)?[ \t]*(\S[^\n]*?)[ \t]*\n({_RST_ADORNMENT})\3{{2,}}[ \t]*$",
    re.M,
)
_SETEXT_RE = re.compile(r"^(\S[^\n]*?)[ \t]*\n(=+|-+)[ \t]*$", re.M)


class DocumentError(Exception):
    """One document could not be used. ``str()`` names the document and the reason."""

    def __init__(self, doc_id: str, reason: str):
        super().__init__(f"{doc_id}: {reason}")
        self.doc_id = doc_id
        self.reason = reason


class DocumentChanging(DocumentError):
    """The file changed between the scan and the read, or during it: a writer is busy with it."""


class DocumentGone(Exception):
    """The document disappeared between the scan and the read (treated as deleted, not an error)."""


@dataclass(frozen=True, slots=True)
class FileStat:
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Document:
    """A normalised document: ``text`` is the body (front matter removed), ready to chunk."""

    doc_id: str
    text: str
    metadata: dict
    size: int
    mtime_ns: int
    content_hash: str
    meta_hash: str


@dataclass
class ScanResult:
    stats: dict[str, FileStat]
    errors: list[tuple[str, str]]  # (doc_id or path, reason) for entries that cannot be documents


def normalize_text(data: bytes, doc_id: str, max_bytes: int) -> str:
    """Decode bytes as UTF-8 (BOM removed) with Unix newlines, or raise ``DocumentError``.

    Binary files are recognised by a NUL byte: valid UTF-8 text never contains one in practice
    and NUL cannot be stored in a PostgreSQL ``text`` column anyway.
    """
    if len(data) > max_bytes:
        raise DocumentError(doc_id, f"document too large ({len(data)} bytes > RAG_MAX_DOC_BYTES={max_bytes})")
    if b"\x00" in data:
        raise DocumentError(doc_id, "binary file (contains NUL bytes); skipped")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(doc_id, f"not valid UTF-8 (byte {e.start}: {e.reason}); skipped") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


DEFAULT_MAX_METADATA_BYTES = 64 * 1024  # RAG_MAX_METADATA_BYTES: canonical JSON of one document's metadata
MAX_METADATA_DEPTH = 32  # containers nested below the metadata object (the webhook door's limit too)
MAX_DERIVED_TITLE_CHARS = 1000  # a title taken from the body's first heading is cut to this
_FRONT_MATTER_YAML_FACTOR = 4  # front matter YAML longer than this x the metadata bound is not parsed
# Integers must be numbers JSON readers can hold: within the range of a double (|n| < 2**1024, 309
# digits). jsonb keeps numbers as decimals and gives 1e20 back as an integer, so a tighter rule
# (64 bits) would refuse floats that went through jsonb once (webhook events in the inbox); a
# 5,000-digit integer cannot even be read back (Python's int/str conversion limit is 4,300 digits).
_INT_LIMIT = 2**1024
_INT_MAX_CHARS = 400  # longer integer literals are refused before they are converted
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"


class _Unusable(Exception):
    """A metadata value that cannot become JSON; turned into a ``DocumentError`` by the caller."""


def _shown(value: object, limit: int = 60) -> str:
    """``value`` as printable text for an error message: control characters, NUL and lone
    surrogates escaped (an error is stored and logged, so it must be storable itself), cut short."""
    s = value if isinstance(value, str) else repr(value)
    out = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in s[: limit + 1])
    return out if len(s) <= limit else out[:limit] + "…"


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


class _FrontMatterLoader(yaml.SafeLoader):
    """YAML's safe loader with limits, so front matter cannot cost more than the metadata bound.

    * nesting is bounded while composing (PyYAML's composer recurses once per level);
    * before any value is built, the node graph is walked once (shared nodes memoised) for a lower
      bound of its JSON size with every alias expanded, so a "billion laughs" alias bomb of a few
      hundred bytes is refused without being expanded, and an anchor used inside itself is refused;
    * mapping keys are the scalars as written (``on: x`` keeps the key ``"on"``; JSON keys are
      strings), non-scalar keys are refused;
    * impossible dates, out-of-range or huge integers, ``.inf``/``.nan`` and ``!!binary`` are refused.
    """

    def __init__(self, stream: str, max_bytes: int):
        super().__init__(stream)
        self._depth = 0
        self._max_bytes = max_bytes

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        self._depth += 1
        try:
            if self._depth > MAX_METADATA_DEPTH + 2:
                raise _Unusable(f"nested deeper than {MAX_METADATA_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def load_front_matter(self) -> object:
        try:
            node = self.get_single_node()
            if node is None:
                return None
            _expanded_lower_bound(node, self._max_bytes)
            return self.construct_document(node)
        finally:
            self.dispose()

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)
        self.flatten_mapping(node)
        mapping: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Unusable(f"a {key_node.id} as a mapping key; keys must be scalars")
            if key_node.tag == "tag:yaml.org,2002:binary":
                raise _Unusable("a !!binary mapping key")
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_strict_timestamp(self, node):  # noqa: ANN001
        try:
            return self.construct_yaml_timestamp(node)
        except (ValueError, OverflowError) as e:
            raise _Unusable(f"impossible date '{_shown(node.value)}' ({e})") from None

    def construct_strict_int(self, node):  # noqa: ANN001
        if len(node.value.replace("_", "")) > _INT_MAX_CHARS:
            raise _Unusable(f"integer too large for metadata, over 2**1024 ({_shown(node.value, 30)})")
        try:
            value = self.construct_yaml_int(node)
        except ValueError as e:
            raise _Unusable(f"unreadable integer '{_shown(node.value)}' ({e})") from None
        if not -_INT_LIMIT < value < _INT_LIMIT:
            raise _Unusable(f"integer too large for metadata, over 2**1024 ({_shown(node.value, 30)})")
        return value

    def construct_strict_float(self, node):  # noqa: ANN001
        value = self.construct_yaml_float(node)
        if not math.isfinite(value):
            raise _Unusable(f"'{_shown(node.value)}' is not a finite number, so not JSON")
        return value

    def construct_no_binary(self, node):  # noqa: ANN001
        raise _Unusable("a !!binary value; metadata holds text, not bytes")


_FrontMatterLoader.add_constructor("tag:yaml.org,2002:timestamp", _FrontMatterLoader.construct_strict_timestamp)
_FrontMatterLoader.add_constructor("tag:yaml.org,2002:int", _FrontMatterLoader.construct_strict_int)
_FrontMatterLoader.add_constructor("tag:yaml.org,2002:float", _FrontMatterLoader.construct_strict_float)
_FrontMatterLoader.add_constructor("tag:yaml.org,2002:binary", _FrontMatterLoader.construct_no_binary)


def _expanded_lower_bound(root: yaml.Node, max_bytes: int) -> int:
    """A lower bound on the JSON size of ``root`` with aliases expanded, refusing it (before it
    is built) once the bound passes ``max_bytes``, or when a node contains itself.

    Each node is sized once (aliases share the node object), so this is linear in the YAML text
    however many times its aliases would expand. Every scalar costs at least one byte, a string at
    least its length plus quotes, a container at least its brackets; merge keys (``<<``) count
    nothing, since merged keys may overlap.
    """
    memo: dict[int, int] = {}
    active: set[int] = set()
    shared = [False]  # an alias was met: say so, it is what makes small YAML large

    def size(node: yaml.Node) -> int:
        known = memo.get(id(node))
        if known is not None:
            shared[0] = True
            return known
        if id(node) in active:
            raise _Unusable("an anchor used inside itself (a recursive alias)")
        if isinstance(node, yaml.ScalarNode):
            n = len(node.value) + 2 if node.tag == _STR_TAG else 1
        else:
            active.add(id(node))
            n, parts = 2, 0
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.tag != _MERGE_TAG:
                        n += size(k) + size(v) + 1  # key, value and the colon
                        parts += 1
            else:
                for v in node.value:
                    n += size(v)
                    parts += 1
            n += max(parts - 1, 0)  # commas
            active.discard(id(node))
        if n > max_bytes:
            raise _Unusable(
                f"it is more than RAG_MAX_METADATA_BYTES={max_bytes} bytes as JSON"
                + (" once its YAML aliases are expanded" if shared[0] else "")
            )
        memo[id(node)] = n
        return n

    return size(root)


def split_front_matter(
    text: str, doc_id: str, max_bytes: int = DEFAULT_MAX_METADATA_BYTES
) -> tuple[dict, str]:
    """Return (front matter as JSON-safe values, body). Front matter that is broken YAML, holds a
    value JSON cannot (see ``_json_safe``) or is larger than ``max_bytes`` is an error naming the
    document."""
    m = _FRONT_MATTER_RE.match(text)
    if not m:
        return {}, text
    yaml_text = m.group(1) or ""
    if len(yaml_text) > _FRONT_MATTER_YAML_FACTOR * max_bytes:
        raise DocumentError(
            doc_id,
            f"front matter is {len(yaml_text)} characters of YAML, more than {_FRONT_MATTER_YAML_FACTOR} x "
            f"RAG_MAX_METADATA_BYTES={max_bytes}; not parsed",
        )
    try:
        data = _FrontMatterLoader(yaml_text, max_bytes).load_front_matter() or {}
        if not isinstance(data, dict):
            raise DocumentError(doc_id, "front matter must be a YAML mapping")
        front = _json_safe(data, max_bytes)
    except yaml.YAMLError as e:
        raise DocumentError(doc_id, f"invalid YAML front matter: {_shown(str(e).replace(chr(10), ' '), 300)}") from None
    except _Unusable as e:
        raise DocumentError(doc_id, f"unusable front matter: {e}") from None
    except RecursionError:
        raise DocumentError(doc_id, "unusable front matter: nested too deeply") from None
    return front, text[m.end() :]


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


def build_metadata(doc_id: str, front: dict, body: str, size: int, mtime_ns: int) -> dict:
    """Canonical document metadata: path, title, size, mtime, then front matter keys."""
    meta: dict = {k: v for k, v in front.items() if k not in RESERVED_META}
    title = front.get("title")
    if not isinstance(title, str) or not title.strip():
        title = first_heading(body) or Path(doc_id).stem
        if len(title) > MAX_DERIVED_TITLE_CHARS:  # a giant heading line is not worth refusing a document
            title = title[: MAX_DERIVED_TITLE_CHARS - 1] + "…"
    meta["title"] = title
    meta["path"] = doc_id
    meta["size"] = size
    meta["mtime"] = dt.datetime.fromtimestamp(mtime_ns / 1e9, tz=dt.UTC).isoformat()
    return meta


def make_document(
    doc_id: str,
    data: bytes,
    mtime_ns: int,
    max_bytes: int,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> Document:
    """Bytes → normalised ``Document`` with hashes. Pure; raises ``DocumentError`` on bad input,
    metadata that JSON/jsonb cannot hold as it is, or metadata over ``max_metadata_bytes``."""
    validate_doc_id(doc_id)
    text = normalize_text(data, doc_id, max_bytes)
    front, body = split_front_matter(text, doc_id, max_metadata_bytes)
    meta = _checked_metadata(
        doc_id, build_metadata(doc_id, front, body, len(data), mtime_ns), max_metadata_bytes
    )
    return Document(doc_id, body, meta, len(data), mtime_ns, content_hash(body), meta_hash(meta))


def validate_doc_id(doc_id: str) -> None:
    """Ids must be storable and unambiguous: non-empty UTF-8 without NUL or control characters."""
    if not doc_id:
        raise DocumentError("<empty id>", "document id is empty")
    if "\x00" in doc_id:
        raise DocumentError(doc_id.replace("\x00", "\\0"), "document id contains a NUL character")
    try:
        doc_id.encode("utf-8")
    except UnicodeEncodeError:
        raise DocumentError(
            doc_id.encode("utf-8", "backslashreplace").decode(), "file name is not valid UTF-8"
        ) from None
    if len(doc_id.encode("utf-8")) > 2048:
        raise DocumentError(doc_id[:80] + "…", "document id longer than 2048 bytes")


class GlobMatcher:
    """Include/exclude globs with ``**``. Patterns like ``**/*.md`` are checked on the file name
    with one regex (fast: ~0.3 µs); anything else goes through wcmatch's full globstar rules."""

    def __init__(self, patterns: Iterable[str]):
        base: list[str] = []
        full: list[str] = []
        for p in patterns:
            rest = p[3:] if p.startswith("**/") else None
            if rest is not None and "/" not in rest and "**" not in rest and "[" not in rest:
                base.append(fnmatch.translate(rest))
            else:
                full.append(p)
        self._base = re.compile("|".join(base)) if base else None
        self._full = wcglob.compile(full, flags=wcglob.GLOBSTAR | wcglob.DOTGLOB) if full else None

    def match(self, rel: str, name: str) -> bool:
        if self._base is not None and self._base.match(name):
            return True
        return bool(self._full is not None and self._full.match(rel))


class FolderSource:
    """Documents are the files under ``root`` matching ``include`` and not ``exclude``."""

    name = "folder"

    def __init__(
        self,
        root: Path | str,
        include: Iterable[str] = ("**/*",),
        exclude: Iterable[str] = (),
        max_doc_bytes: int = 10 * 1024 * 1024,
        max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
    ):
        self.root = Path(root)
        self.max_metadata_bytes = max_metadata_bytes
        self.include = GlobMatcher(include)
        exclude = list(exclude)
        self.exclude = GlobMatcher(exclude) if exclude else None
        self.max_doc_bytes = max_doc_bytes

    def scan(self) -> ScanResult:
        """Stat every matching file once. Symlinks are not followed (they could leave the root).

        Folders are recognised from the directory entry's type (no syscall) and names are matched
        before the ``stat``, so a no-change refresh costs one ``stat`` per indexed file.
        """
        if not self.root.is_dir():
            raise FileNotFoundError(f"source folder does not exist or is not a directory: {self.root}")
        stats: dict[str, FileStat] = {}
        errors: list[tuple[str, str]] = []
        pending = [("", str(self.root))]
        while pending:
            subdirs, st, errs = self._scan_dir(*pending.pop())
            stats.update(st)
            errors.extend(errs)
            pending.extend(subdirs)
        return ScanResult(stats, errors)

    def _scan_dir(
        self, rel_dir: str, abs_dir: str
    ) -> tuple[list[tuple[str, str]], dict[str, FileStat], list[tuple[str, str]]]:
        """One folder: (subfolders, matching files' stats, errors)."""
        subdirs: list[tuple[str, str]] = []
        stats: dict[str, FileStat] = {}
        errors: list[tuple[str, str]] = []
        try:
            it = os.scandir(abs_dir)
        except OSError as e:
            return subdirs, stats, [(rel_dir or ".", f"cannot list folder: {e.strerror}")]
        with it:
            for entry in it:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):  # d_type: no syscall
                        subdirs.append((rel, entry.path))
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if not self.include.match(rel, entry.name):
                        continue
                    if self.exclude is not None and self.exclude.match(rel, entry.name):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we scan: simply not there
                except OSError as e:
                    errors.append((rel, f"cannot stat: {e.strerror}"))
                    continue
                try:
                    validate_doc_id(rel)
                except DocumentError as e:
                    errors.append((e.doc_id, e.reason))
                    continue
                stats[rel] = FileStat(st.st_size, st.st_mtime_ns)
        return subdirs, stats, errors

    def read(self, doc_id: str, expected: FileStat | None = None) -> Document:
        """Read and normalise one document. ``DocumentGone`` if it vanished since the scan.

        No symbolic link is followed in any component (``safe_open.read_under``). ``expected`` is
        the stat the scan saw: a file whose size or mtime moved since then, or during the read, is
        being written; reading it now would index half a file, so it raises
        :class:`DocumentChanging` (the last good version stays; the next run reads it).
        """
        from rag_assets.safe_open import NotRegular, UnsafePath, read_under

        try:
            r = read_under(self.root, doc_id, self.max_doc_bytes)
        except (FileNotFoundError, NotRegular):
            raise DocumentGone(doc_id) from None
        except UnsafePath as e:
            raise DocumentError(doc_id, f"not read: {e} (links are never followed)") from None
        except PermissionError as e:
            raise DocumentError(doc_id, f"cannot read: {e.strerror}") from None
        except OSError as e:
            raise DocumentError(doc_id, f"cannot read: {e.strerror or e}") from None
        if r.size > self.max_doc_bytes:
            raise DocumentError(
                doc_id, f"document too large ({r.size} bytes > RAG_MAX_DOC_BYTES={self.max_doc_bytes})"
            )
        moved = (r.size, r.mtime_ns) != (r.size_after, r.mtime_ns_after) or len(r.data) != r.size
        if expected is not None and (expected.size, expected.mtime_ns) != (r.size, r.mtime_ns):
            moved = True
        if moved:
            raise DocumentChanging(
                doc_id, f"being written during the scan or read ({r.size} → {r.size_after} bytes); read on the next run"
            )
        return make_document(doc_id, r.data, r.mtime_ns, self.max_doc_bytes, self.max_metadata_bytes)


def make_webhook_document(
    doc_id: str,
    content: str,
    metadata: Mapping,
    source_time: dt.datetime,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> Document:
    """A document pushed by a webhook: same normalisation, metadata rules and shape as a file.

    ``mtime`` is the time the source says it changed the document, so the newest-wins rule and
    the metadata agree.
    """
    validate_doc_id(doc_id)
    if not isinstance(content, str):
        raise DocumentError(doc_id, f"content must be text, not {type(content).__name__}")
    if "\x00" in content:
        raise DocumentError(doc_id, "content contains NUL characters")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DocumentError(doc_id, f"content contains a lone surrogate at character {e.start}") from None
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise DocumentError(doc_id, f"metadata must be an object, not {type(metadata).__name__}")
    try:
        front = _json_safe(dict(metadata), max_metadata_bytes)
    except _Unusable as e:
        raise DocumentError(doc_id, f"unusable metadata: {e}") from None
    except RecursionError:
        raise DocumentError(doc_id, "unusable metadata: nested too deeply") from None
    text = content.replace("\r\n", "\n").replace("\r", "\n")
    size = len(text.encode("utf-8"))
    mtime_ns = int(source_time.timestamp() * 1_000_000) * 1000
    meta = _checked_metadata(doc_id, build_metadata(doc_id, front, text, size, mtime_ns), max_metadata_bytes)
    return Document(doc_id, text, meta, size, mtime_ns, content_hash(text), meta_hash(meta))
