"""YAML front matter: where a leading metadata block ends, and its YAML read within bounds.

One parser for every reader of front matter: the sources (folder, object store) take the block
as metadata and the rest as the body; the chunkers skip the block, so it is never chunked. Before,
the source and the chunker followed different rules (the source refused ``---``/``Title``/``---``,
a reST over- and underlined title, as "front matter must be a YAML mapping"; the chunker read it as
a title), so the same file could be metadata for one and text for the other.

The rules, on *normalised* text (UTF-8 decoded with any BOM removed, ``\\r\\n`` and ``\\r`` turned
into ``\\n``; :func:`rag_assets.sources.normalize_text` does that for files and objects, so a BOM or
CRLF line ends never hide a block, and a block is never recognised in un-normalised text):

1. The block starts at the very first character: the first line is ``---`` followed by nothing but
   whitespace. A block further down (after a blank line, a BOM-less title...) is body text.
2. It ends at the first later line that is ``---`` or ``...`` followed by nothing but spaces or
   tabs; the block includes that line and its line end.
3. No closing line: there is no front matter; the whole text is body (nothing is lost).
4. A block whose content has exactly one non-blank line that does not look like ``key: value`` is
   a reST over- and underlined title (``---`` / ``Title`` / ``---``), not front matter: body text.
5. Every other block is front matter, whatever the file's format (``.md``, ``.rst``, ``.txt``): an
   empty block is empty metadata; its YAML must be a mapping, read by :func:`load_yaml_mapping`
   with the bounds below; YAML that is broken or not a mapping makes the document an error naming
   it (the source skips it and keeps its last good version), never silently body text.
6. A chunker applies rules 1-4 to the text it is given, which for a file is the body after the
   source removed its block: a *second* leading block, or one at the top of a webhook document's
   ``content``, is not chunked either (webhook metadata comes only from the event's ``metadata``).

The YAML is read by a bounded safe loader (:class:`_FrontMatterLoader`): its cost is bounded by
the metadata bound, whatever the input.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import yaml

MAX_METADATA_DEPTH = 32  # containers nested below the metadata object (the webhook door's limit too)
# Integers must be numbers JSON readers can hold: within the range of a double (|n| < 2**1024, 309
# digits). jsonb keeps numbers as decimals and gives 1e20 back as an integer, so a tighter rule
# (64 bits) would refuse floats that went through jsonb once (webhook events in the inbox); a
# 5,000-digit integer cannot even be read back (Python's int/str conversion limit is 4,300 digits).
INT_LIMIT = 2**1024
_INT_MAX_CHARS = 400  # longer integer literals are refused before they are converted
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"

_CLOSE = re.compile(r"^(?:---|\.\.\.)[ \t]*$", re.M)
_YAML_KEY = re.compile(r"^[ \t]*[\w\"'$@-][^:\n]*:(?:[ \t]|$)", re.M)


class Unusable(Exception):
    """A front matter or metadata value that cannot become JSON; the caller names the document."""


class NotAMapping(Exception):
    """The front matter's YAML is valid but not a mapping (a list, a scalar)."""


def shown(value: object, limit: int = 60) -> str:
    """``value`` as printable text for an error message: control characters, NUL and lone
    surrogates escaped (an error is stored and logged, so it must be storable itself), cut short."""
    s = value if isinstance(value, str) else repr(value)
    out = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in s[: limit + 1])
    return out if len(s) <= limit else out[:limit] + "…"


@dataclass(frozen=True, slots=True)
class FrontMatterBlock:
    """A leading front-matter block: ``text[yaml_start:yaml_end]`` is its YAML, the body starts
    at ``end``."""

    yaml_start: int
    yaml_end: int
    end: int


def find_front_matter(text: str) -> FrontMatterBlock | None:
    """The leading front-matter block of normalised ``text`` by rules 1-4 of the module docstring,
    or None. Pure and linear in the block's length."""
    if not text.startswith("---"):
        return None
    nl = text.find("\n")
    if nl < 0 or text[:nl].rstrip() != "---":
        return None
    close = _CLOSE.search(text, nl + 1)
    if close is None:
        return None
    body = text[nl + 1 : close.start()]
    lines = [ln for ln in body.split("\n") if ln.strip()]
    if len(lines) == 1 and not _YAML_KEY.match(lines[0]):
        return None  # a reST over- and underlined title
    end = close.end()
    return FrontMatterBlock(nl + 1, close.start(), end + 1 if end < len(text) else end)


def front_matter_end(text: str) -> int:
    """Offset just past the leading front-matter block, else 0 (what a chunker skips)."""
    block = find_front_matter(text)
    return 0 if block is None else block.end


def load_yaml_mapping(yaml_text: str, max_bytes: int) -> dict:
    """The block's YAML as a mapping (``{}`` when empty), read by the bounded loader.

    Raises ``yaml.YAMLError`` (broken YAML), :class:`NotAMapping`, :class:`Unusable` (a value
    metadata cannot hold, or more than ``max_bytes`` once aliases are expanded) or RecursionError.
    """
    data = _FrontMatterLoader(yaml_text, max_bytes).load_front_matter() or {}
    if not isinstance(data, dict):
        raise NotAMapping("front matter must be a YAML mapping")
    return data


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
                raise Unusable(f"nested deeper than {MAX_METADATA_DEPTH} levels")
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
                raise Unusable(f"a {key_node.id} as a mapping key; keys must be scalars")
            if key_node.tag == "tag:yaml.org,2002:binary":
                raise Unusable("a !!binary mapping key")
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_strict_timestamp(self, node):  # noqa: ANN001
        try:
            return self.construct_yaml_timestamp(node)
        except (ValueError, OverflowError) as e:
            raise Unusable(f"impossible date '{shown(node.value)}' ({e})") from None

    def construct_strict_int(self, node):  # noqa: ANN001
        if len(node.value.replace("_", "")) > _INT_MAX_CHARS:
            raise Unusable(f"integer too large for metadata, over 2**1024 ({shown(node.value, 30)})")
        try:
            value = self.construct_yaml_int(node)
        except ValueError as e:
            raise Unusable(f"unreadable integer '{shown(node.value)}' ({e})") from None
        if not -INT_LIMIT < value < INT_LIMIT:
            raise Unusable(f"integer too large for metadata, over 2**1024 ({shown(node.value, 30)})")
        return value

    def construct_strict_float(self, node):  # noqa: ANN001
        value = self.construct_yaml_float(node)
        if not math.isfinite(value):
            raise Unusable(f"'{shown(node.value)}' is not a finite number, so not JSON")
        return value

    def construct_no_binary(self, node):  # noqa: ANN001
        raise Unusable("a !!binary value; metadata holds text, not bytes")


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
            raise Unusable("an anchor used inside itself (a recursive alias)")
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
            raise Unusable(
                f"it is more than RAG_MAX_METADATA_BYTES={max_bytes} bytes as JSON"
                + (" once its YAML aliases are expanded" if shared[0] else "")
            )
        memo[id(node)] = n
        return n

    return size(root)
