"""Split normalised document text into chunks whose boundaries survive edits.

Why this module exists
----------------------
The index's promise is "embed only what changed": a chunk is embedded once, keyed by the hash of
its text, and reused for as long as that exact text keeps appearing. That promise is only as good
as the chunker's *edit locality*. A fixed window ("every 512 words") or a greedy "fill each chunk
to size from the top of the section" shifts every later boundary when one sentence is inserted,
so a one-line edit re-embeds the rest of the document. :class:`StructureChunker` instead

1. splits the text along its structure (Markdown and reStructuredText headings, paragraphs,
   fenced code, reST literal/indented blocks, lists). Every heading starts a new chunk, so an
   edit never moves a boundary in another section, and a section that fits the token bound is
   exactly one chunk;
2. cuts a longer section at *content-defined* boundaries: after block ``i`` when the block's own
   hash is the largest among the blocks ending within ``radius`` characters of it (a "local
   maximum" rule). Whether a boundary exists depends only on the text within that radius, so
   after an edit the boundaries resynchronise within one radius on either side and the chunks
   further away keep their exact text (and chunk_hash). Measured on the Django 5.0 docs, a random
   paragraph insertion, deletion or modification creates 1.13 new chunk texts on average, at
   most 3; upgrading the docs 5.0 -> 5.1 creates 671 new chunk texts (174k tokens) where
   re-embedding changed documents would send 4,800 chunks (1.07M tokens);
3. bounds every chunk by ``max_tokens``, both as estimated by :func:`count_tokens` and as counted
   by the tokenizer whose count the index stores (``tokens.count_tokens_batch``, cl100k_base):
   where two natural boundaries are too far apart a boundary is forced (again chosen by block
   hash), and a single block that is too large is split at sentence, clause, line, then word
   boundaries, and as a last resort at characters. The estimate can be low (2x on text BPE
   splits finely), so every chunk is then counted exactly and one still over the bound is
   chunked again with a tighter estimate bound, or cut by the exact count.

:class:`FixedWindowChunker` is the naive 512-word window, kept only so benchmarks and tests can
show what the structure chunker saves.

Everything here is pure (no I/O, no database, no Dagster), deterministic (no Python ``hash()``,
no dict-order or hash-seed dependence) and fast: the 5.9 MB of Django 5.0 docs chunk in ~0.25 s.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from rag_assets.front_matter import front_matter_end
from rag_assets.tokens import count_tokens_batch, tokenizer_name

__all__ = [
    "FIXED_CHUNKER_VERSION",
    "HEADING_PATH_SEPARATOR",
    "STRUCTURE_CHUNKER_VERSION",
    "TOKEN_ESTIMATOR_VERSION",
    "Chunk",
    "Chunker",
    "FixedWindowChunker",
    "StructureChunker",
    "context_header",
    "count_tokens",
    "heading_path_of",
    "make_chunker",
]

# Bump a version whenever the same input could produce different chunks (or token counts): the
# version is part of the chunks asset's code_version, so bumping it re-chunks (not re-embeds:
# unchanged chunk texts still hit the embedding cache).
TOKEN_ESTIMATOR_VERSION = "tok1"
STRUCTURE_CHUNKER_VERSION = "structure-v3"  # v3: heading-path header, no heading/markup-only chunks
# (v2: the bound holds for the stored (cl100k) count too)
FIXED_CHUNKER_VERSION = "fixed512-v1"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of a document: ``text == context + doc_text[start:end]``.

    ``text`` is what the index stores, embeds, full-text indexes and returns: the chunk's
    ``context`` (its heading path as a one-line header, ``"Title › Section\n\n"``, or ``""`` for
    text before the first heading and for chunkers without structure) followed by the document
    slice (:attr:`body`). ``chunk_hash`` (a prefix of sha256 of ``text``) is the embedding cache
    key, so it changes exactly when what is embedded changes: the slice, or the heading path (a
    renamed section re-embeds the chunks under it, nothing else). ``text`` never starts or ends
    with whitespace, which keeps the hash independent of how much blank space surrounds a block.
    """

    seq: int
    text: str
    start: int
    end: int
    chunk_hash: str
    n_tokens: int
    heading_path: tuple[str, ...] = ()
    context: str = ""

    @property
    def body(self) -> str:
        """The document slice ``doc_text[start:end]`` (``text`` without the context header)."""
        return self.text[len(self.context) :]


def chunk_hash(text: str) -> str:
    """The cache key of a chunk text: the first 32 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


# The contextual header: the heading path joined by " › ", then a blank line. A title containing
# "›" has it replaced by ">", so the header splits back into the path exactly (heading_path_of).
HEADING_PATH_SEPARATOR = " \u203a "
_CONTEXT_END = "\n\n"
_MAX_TITLE_CHARS = 200


def context_header(path: tuple[str, ...] | list[str]) -> str:
    """The header a chunk under ``path`` starts with: ``"A › B\n\n"``, or ``""`` for no path."""
    return HEADING_PATH_SEPARATOR.join(path) + _CONTEXT_END if path else ""


def heading_path_of(text: str, body_chars: int) -> list[str]:
    """The heading path of a stored chunk ``text`` whose document slice has ``body_chars``
    characters (``char_end - char_start``): the header is everything before the slice.

    Used at query time, where a hit has its text and its chunk row's span but no stored path:
    the path is carried by the text itself, so snapshots, restores and old generations need no
    column for it (a chunk of a generation built before the header gives ``[]``).
    """
    if body_chars < 0 or body_chars > len(text):
        return []
    head = text[: len(text) - body_chars]
    if not head.endswith(_CONTEXT_END):
        return []
    head = head[: -len(_CONTEXT_END)]
    return head.split(HEADING_PATH_SEPARATOR) if head else []


@runtime_checkable
class Chunker(Protocol):
    """What the pipeline needs from a chunker.

    ``version`` must change whenever ``chunk`` could return something different for the same
    input, parameters included, because it decides whether stored chunks are still valid.
    """

    version: str

    def chunk(self, text: str) -> list[Chunk]: ...


# --------------------------------------------------------------------------------------------
# Token estimate
# --------------------------------------------------------------------------------------------
#
# Chunks must fit an embedding model's input, and the pipeline budgets tokens per request, so we
# need a token count for every chunk. Running a real BPE tokenizer over the corpus costs more
# than chunking it, and each provider uses a different one. Instead we estimate cl100k_base (the
# tokenizer of OpenAI's embedding models) from character classes, weighting each character by the
# class it belongs to and by the class of the one or two characters before it. Because a
# character's weight depends only on a short look-behind, the estimate for any slice of a document
# that starts after whitespace equals a difference of prefix sums, which is what makes
# bounded-size chunking cheap.
#
# Weights are in 1/16 token. They were fitted by a linear programme that minimises the total
# estimate while charging every under-counted token 50x (so it errs high), then rounded, on
# 1,000-character windows and on paragraphs of four corpora, against tiktoken's cl100k_base:
# Django 5.0 docs (reST), Node.js API docs (Markdown), this repo's sample corpus, and 400 files of
# Python source. Measured bound (texts of >= 200 characters):
#
#   corpus (unit)          estimate/actual   actual/estimate: p99   p99.9   worst
#   Django reST (windows)        1.17                        0.97   1.03    1.08
#   Django reST (chunks)         1.17                        1.00   -       1.16
#   Node.js Markdown (chunks)    1.15                        0.99   -       1.13
#   Markdown (paragraphs)        1.16                        1.01   1.08    1.14
#   Python (windows)             1.18                        1.00   1.15    1.77
#
# i.e. it over-counts by ~15-18% and under-counts real text by at most ~15%. No Django chunk
# exceeds 505 real tokens at max_tokens=512 (Node.js: 515). The worst Python windows are lists
# of non-words (LAPACK routine names such as "ggbak ggbal gges"): each splits into several BPE
# tokens and a class-based estimate cannot know which letter strings are words.
# Non-ASCII characters are charged by their UTF-8 length: 1 token for 2-byte characters (Latin
# accents, Greek, Cyrillic: real 0.3-0.9), 2 for 3-byte ones (CJK: real 1.0-1.3; rare scripts up
# to 3) and 4 for 4-byte ones (emoji, rare CJK: real 2-3, at most 4 = one token per byte).

_UNIT = 16  # weights are in 1/16 token
_LOW, _UP, _DIG, _PUN, _SP, _NL, _TAB, _CTL, _U2, _U3, _U4 = range(11)
_NCLASS = 11

_ASCII_CLASS = np.full(128, _CTL, dtype=np.uint16)
for _c in range(128):
    _ch = chr(_c)
    if "a" <= _ch <= "z":
        _ASCII_CLASS[_c] = _LOW
    elif "A" <= _ch <= "Z":
        _ASCII_CLASS[_c] = _UP
    elif "0" <= _ch <= "9":
        _ASCII_CLASS[_c] = _DIG
    elif _ch == " ":
        _ASCII_CLASS[_c] = _SP
    elif _ch in "\n\r":
        _ASCII_CLASS[_c] = _NL
    elif _ch == "\t":
        _ASCII_CLASS[_c] = _TAB
    elif 33 <= _c <= 126:
        _ASCII_CLASS[_c] = _PUN

_BASE_WEIGHT = {
    _LOW: 1,
    _UP: 1,
    _DIG: 5,
    _PUN: 8,
    _SP: 0,
    _NL: 0,
    _TAB: 8,
    _CTL: 16,
    _U2: 16,
    _U3: 32,
    _U4: 64,
}
_LETTER_START = 14  # a letter after a non-letter: one more word piece
_CAMEL_HUMP = 8  # an upper-case letter after a lower-case one: "DTypeLike" splits at humps
_DIGIT_START = 27  # cl100k splits numbers into groups of <= 3 digits
_PUNCT_START = 4  # a run of punctuation
_PUNCT_REPEAT = -6  # the same punctuation character again ("=====", "``"): BPE merges these
_SPACE_RUN = 24  # the second space of a run of spaces (indentation, alignment)
_LONG_WORD = 2  # each letter with >= 6 letters before it: long words split into pieces


def _build_trigram_weights() -> np.ndarray:
    table = np.zeros(_NCLASS**3, dtype=np.int32)
    letters = (_LOW, _UP)
    for p2 in range(_NCLASS):
        for p1 in range(_NCLASS):
            for c in range(_NCLASS):
                w = _BASE_WEIGHT[c]
                if c in letters and p1 not in letters:
                    w += _LETTER_START
                if c == _UP and p1 == _LOW:
                    w += _CAMEL_HUMP
                if c == _DIG and p1 != _DIG:
                    w += _DIGIT_START
                if c == _PUN and p1 != _PUN:
                    w += _PUNCT_START
                if c == _SP and p1 == _SP and p2 != _SP:
                    w += _SPACE_RUN
                table[(p2 * _NCLASS + p1) * _NCLASS + c] = w
    return table


_TRIGRAM_WEIGHT = _build_trigram_weights()


def _code_points_and_classes(text: str) -> tuple[np.ndarray, np.ndarray]:
    if text.isascii():
        cp = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        return cp, _ASCII_CLASS[cp]
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    cls = _ASCII_CLASS[np.minimum(cp, 127)]
    cls[cp >= 0x80] = _U2
    cls[cp >= 0x800] = _U3
    cls[cp >= 0x10000] = _U4
    return cp, cls


def _char_weights(text: str) -> np.ndarray:
    """Per-character token weights (in 1/16 token) for ``text`` read on its own.

    A character's weight depends on it and the (at most 6) characters before it; the text start
    behaves like a preceding newline. So for a slice starting right after whitespace, the slice's
    weights equal the corresponding weights of the whole text.
    """
    cp, cls = _code_points_and_classes(text)
    n = cls.shape[0]
    idx = np.empty(n, dtype=np.uint16)
    idx[:] = cls
    idx[1:] += cls[:-1] * _NCLASS
    idx[:1] += _NL * _NCLASS
    idx[2:] += cls[:-2] * (_NCLASS * _NCLASS)
    idx[:2] += _NL * _NCLASS * _NCLASS
    w = _TRIGRAM_WEIGHT[idx]
    w[1:] += _PUNCT_REPEAT * ((cp[1:] == cp[:-1]) & (cls[1:] == _PUN))
    if n > 6:
        letters = np.empty(n + 1, dtype=np.int32)
        letters[0] = 0
        np.cumsum(cls <= _UP, out=letters[1:])
        w[6:] += _LONG_WORD * ((letters[7:] - letters[:-7]) == 7)
    return w


def _units_to_tokens(units: int) -> int:
    return -(-units // _UNIT)


def count_tokens(text: str) -> int:
    """A fast, conservative estimate of the cl100k_base token count of ``text``.

    About 15-18% above the real count on English, reStructuredText, Markdown and Python; on 99% of
    texts of 200+ characters it is not below the real count, and at worst ~15% below (reST and
    Markdown; measurements and the exceptions are in the notes above ``_UNIT``). It runs at
    30-60 MB/s (numpy), so the chunker can afford it on every document. Empty text counts 0, any
    other text at least 1.
    """
    if not text:
        return 0
    return max(1, _units_to_tokens(int(_char_weights(text).sum())))


# --------------------------------------------------------------------------------------------
# Structure: front matter, flavour, fences, headings, blocks
# --------------------------------------------------------------------------------------------

_NON_SPACE = re.compile(r"\S")

# Line-start patterns are written as "\n..." and run over ``padded = "\n" + text`` rather than as
# "^..." with re.M: a literal first character lets the regex engine skip ahead with a fast scan
# (about 5x faster on large texts). A match at padded offset ``i`` is the line starting at text
# offset ``i``; the pattern's other offsets are one more in padded than in text.
#
# reST explicit markup (directives, comments, targets, substitutions) vs Markdown-only signals
# (ATX headings, backtick fences; not "~~~", which is also a common reST title underline).
_RST_SIGNAL = re.compile(r"\n\.\.(?:[ \t]+\S|[ \t]*(?:\n|\Z))")
_MD_SIGNAL = re.compile(r"\n {0,3}(?:#{1,6}[ \t]+\S|```)")

_FENCE_OPEN = re.compile(r"\n {0,3}(`{3,}|~{3,})([^\n]*)")
_FENCE_CLOSE_CACHE: dict[tuple[str, int], re.Pattern[str]] = {}

_ATX = re.compile(r"\n( {0,3})#{1,6}(?:[ \t][^\n]*)?(?=\n|\Z)")
# A line made of one repeated punctuation character: a reST adornment (or setext underline) when
# it follows a title line. Adornment lines are rare, so we find them first and look back.
_ADORNMENT_LINE = re.compile(r"\n(([!-/:-@\[-`{-~])\2*)[ \t]*(?=\n|\Z)")
_ADORNMENT_ONLY = re.compile(r"([!-/:-@\[-`{-~])\1*")
_BULLET = re.compile(r"[ \t]*[-*+\u2022][ \t]")

# A block: maximal run of non-blank lines, trimmed (starts and ends on non-whitespace).
_BLOCK = re.compile(r"\S(?:[^\n]*\S)?(?:[^\S\n]*\n[^\S\n]*\S(?:[^\n]*\S)?)*")

# Split points for an over-long block, strongest first: after a sentence end, after a clause
# mark, at a line break, at whitespace. Pieces are the (trimmed) text between split points. All are
# linear-time (no nested quantifiers over the same characters).
_SENTENCE_SPLIT = re.compile(
    r"[.!?][\"'\u2019\u201d)\]]*(?=\s)|[\u3002\uff01\uff1f][\"'\u2019\u201d)\]\u300d\u300f]*"
)
_CLAUSE_SPLIT = re.compile(r"[,;:](?=\s)")
_LINE_SPLIT = re.compile(r"\n")
_SPACE_SPLIT = re.compile(r"\s+")
_PROSE_LEVELS = (_SENTENCE_SPLIT, _CLAUSE_SPLIT, _LINE_SPLIT, _SPACE_SPLIT)
_CODE_LEVELS = (_LINE_SPLIT, _SPACE_SPLIT)

# The last line of a block after which we never cut unless forced, because it introduces what
# follows: "Example::", "as follows:", ".. code-block:: python", ".. _label:".
_DIRECTIVE_LINE = re.compile(r"[ \t]*\.\.[ \t]+[\w:|-]+::")


def _introduces_next(piece: str) -> bool:
    if piece.endswith(":"):
        return True
    return _DIRECTIVE_LINE.match(piece, piece.rfind("\n") + 1) is not None


def _looks_like_markdown(padded: str, base: int) -> bool:
    """Markdown or reST? Count Markdown-only line starts (ATX headings, code fences) against reST
    explicit markup (``.. directive::``, ``.. _target:``, comments); ties go to reST."""
    md = len(_MD_SIGNAL.findall(padded, base))
    return md > 0 and md > len(_RST_SIGNAL.findall(padded, base))


def _fence_close(ch: str, n: int) -> re.Pattern[str]:
    key = (ch, n)
    pat = _FENCE_CLOSE_CACHE.get(key)
    if pat is None:
        pat = re.compile(rf"\n {{0,3}}{re.escape(ch)}{{{n},}}[ \t]*(?=\n|\Z)")
        _FENCE_CLOSE_CACHE[key] = pat
    return pat


def _find_fences(padded: str, base: int) -> list[tuple[int, int]]:
    """Spans (text offsets) of closed Markdown code fences, from the fence to the closing fence.

    An unclosed fence is treated as text (CommonMark would run it to the end of the document) so
    that one stray ``` cannot swallow, and re-chunk, everything after it.
    """
    spans: list[tuple[int, int]] = []
    pos = base
    while True:
        m = _FENCE_OPEN.search(padded, pos)
        if m is None:
            return spans
        fence = m.group(1)
        if fence[0] == "`" and "`" in m.group(2):
            pos = m.end()
            continue
        c = _fence_close(fence[0], len(fence)).search(padded, m.end())
        if c is None:
            pos = m.end()
            continue
        spans.append((m.start(1) - 1, c.start() + len(c.group().rstrip()) - 1))
        pos = c.end()


def _inside(spans: list[tuple[int, int]], pos: int) -> bool:
    """Is ``pos`` inside one of the sorted, disjoint ``spans``?"""
    lo, hi = 0, len(spans)
    while lo < hi:
        mid = (lo + hi) // 2
        if spans[mid][1] <= pos:
            lo = mid + 1
        else:
            hi = mid
    return lo < len(spans) and spans[lo][0] <= pos


def _find_headings(
    text: str, padded: str, base: int, markdown: bool, fences: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Heading spans ``(start, end)`` (text offsets, trimmed), in document order.

    reST: a title line under (and optionally over) a line of one repeated punctuation character
    at least as long as the title (or >= 4 characters, as docutils accepts), after a blank line.
    Markdown (when the document looks like Markdown): ATX ``#`` headings and setext
    ``===``/``---`` underlines; nothing inside a code fence is a heading.
    """
    found: list[tuple[int, int, bool]] = []  # (start, end, must follow a blank line)
    if markdown:
        for m in _ATX.finditer(padded, base):
            ls = m.start()  # text offset of the line
            if not _inside(fences, ls):
                found.append((ls + len(m.group(1)), ls + len(m.group().rstrip()) - 1, False))
    for m in _ADORNMENT_LINE.finditer(padded, base):
        us = m.start()  # text offset of the underline
        if us <= base:
            continue
        ts = text.rfind("\n", 0, us - 1) + 1
        if ts < base:
            continue
        title = text[ts : us - 1]
        adorn = m.group(1)
        stripped = title.strip()
        if not stripped or _ADORNMENT_ONLY.fullmatch(stripped) or _BULLET.match(title):
            continue
        if markdown:
            if adorn[0] not in "=-" or len(title) - len(title.lstrip(" ")) > 3:
                continue
        elif len(adorn) < 4 and len(adorn) < len(stripped):
            continue
        start = ts
        if ts > base:
            os_ = text.rfind("\n", 0, ts - 1) + 1
            if os_ >= base and text[os_ : ts - 1].rstrip() == adorn:
                start = os_  # over- and underlined title
        if start == ts:
            if title[0].isspace() and not markdown:
                continue  # an indented line is a reST section title only under an overline
            start = ts + len(title) - len(title.lstrip())
        if fences and (_inside(fences, ts) or _inside(fences, us)):
            continue
        found.append((start, us + len(adorn), True))
    if not found:
        return []
    found.sort()
    headings: list[tuple[int, int]] = []
    last_end = base
    for s, e, needs_blank in found:
        if headings and s < headings[-1][1]:
            continue
        if needs_blank:
            ls = text.rfind("\n", 0, s) + 1
            if ls > base:
                prev = text.rfind("\n", 0, ls - 1) + 1
                if text[prev : ls - 1].strip() and (not headings or text[last_end:ls].strip()):
                    continue  # a title must follow a blank line (or another heading)
        headings.append((s, e))
        last_end = e
    return headings


def _blocks(text: str, start: int, end: int, fences: list[tuple[int, int]]) -> list[list]:
    """Blocks ``[start, end, indent, is_code]`` of ``text[start:end]``: paragraphs, list items,
    indented blocks, with each code fence kept as one block even across blank lines."""
    out: list[list] = []
    pos = start
    rfind = text.rfind
    for fs, fe in fences:
        if fe <= start or fs >= end:
            continue
        for m in _BLOCK.finditer(text, pos, fs):
            s = m.start()
            out.append([s, m.end(), s - rfind("\n", 0, s) - 1, False])
        out.append([fs, fe, fs - rfind("\n", 0, fs) - 1, True])
        pos = fe
    for m in _BLOCK.finditer(text, pos, end):
        s = m.start()
        out.append([s, m.end(), s - rfind("\n", 0, s) - 1, False])
    return out


# Markup that renders as nothing but introduces what follows: a chunk made only of it (and of
# headings) is noise that matches any question about its words ("How Does It Work?", "(how)=").
# One line of such markup: a MyST target "(label)=", a reST target ".. _label:" (or a named
# hyperlink ".. _name: URL"), an anonymous target "__ URL", a substitution definition, an empty
# comment "..", a Markdown thematic break, a reST transition or stray adornment line, an HTML
# anchor (<a name=...>, <a id=...>, an empty <span|div id=...>) or a one-line HTML comment.
_MARKUP_LINE = re.compile(
    r"""[ \t]*(?:
        \([^()\s]+\)=
      | \.\.[ \t]+_[^\n]*?:(?:[ \t]+\S+)?
      | __[ \t]+\S+
      | \.\.[ \t]+\|[^|\n]+\|[ \t]+[\w-]+::[^\n]*
      | \.\.
      | ([-*_])(?:[ \t]*\1){2,}
      | ([!-/:-@\[-`{-~])\2{3,}
      | <a\s[^<>\n]*\b(?:name|id)=[^<>\n]*>[ \t]*(?:</a>)?
      | <(span|div)\s[^<>\n]*\bid=[^<>\n]*>[ \t]*</\3>
      | <!--[^\n]*?-->
    )[ \t]*""",
    re.X,
)
# Sphinx directives that render nothing in place (index entries, the current module, highlighting
# defaults, a local table of contents, authorship, HTML meta): the directive and its indented
# options or body are markup.
_MARKUP_DIRECTIVE = re.compile(
    r"[ \t]*\.\.[ \t]+(?:index|contents|highlight|currentmodule|module|default-role|default-domain"
    r"|sectionauthor|moduleauthor|codeauthor|meta|tags|py:currentmodule|py:module|program)::"
)


def _markup_flags(text: str, blocks: list[list]) -> list[bool]:
    """For each block: is it markup only (see ``_MARKUP_LINE``, ``_MARKUP_DIRECTIVE``)? A block
    indented deeper than a markup directive just before it is that directive's body."""
    flags: list[bool] = []
    directive_indent = -1
    for bs, be, ind, code in blocks:
        if directive_indent >= 0 and ind > directive_indent:
            flags.append(True)
            continue
        directive_indent = -1
        if code:
            flags.append(False)
            continue
        piece = text[bs:be]
        lines = piece.split("\n")
        if _MARKUP_DIRECTIVE.match(lines[0]) and all(ln[:1].isspace() for ln in lines[1:]):
            flags.append(True)
            directive_indent = ind
        else:
            flags.append(all(_MARKUP_LINE.fullmatch(ln) for ln in lines))
    return flags


def _is_markup_text(piece: str) -> bool:
    """Is ``piece`` (one or more blocks) markup only? It then introduces what follows it."""
    lines = [ln for ln in piece.split("\n") if ln.strip()]
    if _MARKUP_DIRECTIVE.match(lines[0]) and all(ln[:1].isspace() for ln in lines[1:]):
        return True
    return all(_MARKUP_LINE.fullmatch(ln) for ln in lines)


_ATX_TITLE = re.compile(r"#{1,6}[ \t]*(.*?)(?:[ \t]+#+)?[ \t]*")
_SPACES = re.compile(r"\s+")


def _heading_titles(text: str, headings: list[tuple[int, int]], markdown: bool) -> list[tuple[int, str]]:
    """``(level, title)`` of each heading span. Markdown: ``#`` count, setext ``=`` 1 and ``-`` 2.
    reST: the order in which each adornment style (character, with or without overline) first
    appears, as docutils assigns levels."""
    styles: dict[tuple[str, bool], int] = {}
    out: list[tuple[int, str]] = []
    for s, e in headings:
        seg = text[s:e]
        lines = seg.split("\n")
        if len(lines) == 1:  # ATX
            m = _ATX_TITLE.fullmatch(seg.strip())
            level = len(seg) - len(seg.lstrip("#"))
            title = m.group(1) if m else seg.strip("# \t")
        else:
            over = len(lines) >= 3
            title = lines[1] if over else lines[0]
            char = lines[-1].strip()[:1]
            if markdown:
                level = 1 if char == "=" else 2
            else:
                level = styles.setdefault((char, over), len(styles) + 1)
        title = _SPACES.sub(" ", title).strip().replace("\u203a", ">")[:_MAX_TITLE_CHARS].rstrip()
        out.append((level, title))
    return out


@dataclass(slots=True)
class _Section:
    """What becomes one chunk, or several when it is over the bound: ``text[start:end]``, with
    ``heading`` (the heading span, from ``start``: the headings and markup that lead into the
    content) kept together with the first content, and the heading path of the content."""

    heading: tuple[int, int] | None
    start: int
    content_start: int
    end: int
    path: tuple[str, ...]


def _sections(
    text: str, base: int, headings: list[tuple[int, int]], markdown: bool, fences: list[tuple[int, int]]
) -> tuple[list[_Section], int]:
    """Group the document into sections such that none is made only of headings and markup.

    Headings and markup (targets, anchors, index entries, breaks) carry forward to the content
    they introduce: a title directly followed by a subsection title, a ``(label)=`` or
    ``.. _label:`` in front of a heading, a section whose body is only an ``.. index::`` all start
    the next section that has content. Trailing markup of a section (the label of the next
    heading) moves to the next section too. What has no content after it (headings at the end of
    the document) joins the last section; a document of nothing but markup is one section.
    Also returns where that last part begins (``len(text) + 1`` when there is none).
    """
    titles = _heading_titles(text, headings, markdown)
    raw: list[tuple[int, int, int]] = [(-1, base, headings[0][0] if headings else len(text))]
    for k, (_hs, he) in enumerate(headings):
        raw.append((k, he, headings[k + 1][0] if k + 1 < len(headings) else len(text)))
    stack: list[tuple[int, str]] = []
    out: list[_Section] = []
    tail = len(text) + 1
    pending = -1  # start of the headings/markup carried to the next section with content
    for idx, (k, bs, be) in enumerate(raw):
        if k >= 0:
            level, title = titles[k]
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, title))
            if pending < 0:
                pending = headings[k][0]
        blocks = _blocks(text, bs, be, fences)
        if not blocks:
            continue
        flags = _markup_flags(text, blocks)
        content = [i for i, f in enumerate(flags) if not f]
        if not content:
            if pending < 0:
                pending = blocks[0][0]
            continue
        last = content[-1]
        is_last = idx == len(raw) - 1
        end = blocks[-1][1] if is_last else blocks[last][1]
        path = tuple(t for _, t in stack if t) if k >= 0 else ()
        # The lead (headings, then markup before the first content block) stays with that block.
        first = content[0]
        if k >= 0:
            lead_end = blocks[first - 1][1] if first else headings[k][1]
            out.append(_Section((pending, lead_end), pending, lead_end, end, path))
        elif first:
            lead_end = blocks[first - 1][1]
            out.append(_Section((blocks[0][0], lead_end), blocks[0][0], lead_end, end, path))
        else:
            out.append(_Section(None, blocks[0][0], blocks[0][0], end, path))
        pending = blocks[last + 1][0] if last + 1 < len(blocks) else -1
        if is_last and pending >= 0:
            tail, pending = pending, -1  # markup ending the document: it ends this section
    if pending >= 0:
        end = len(text.rstrip())
        if out:
            out[-1].end = end
            tail = pending
        else:
            path = tuple(t for _, t in stack if t)
            out.append(_Section(None, pending, pending, end, path))
    return out, tail


def _cut_hash(piece: str) -> int:
    """Deterministic 64-bit hash of a block: decides content-defined boundaries."""
    return int.from_bytes(
        hashlib.blake2b(piece.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big"
    )


# --------------------------------------------------------------------------------------------
# Chunkers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _context(path: tuple[str, ...], cap: int) -> tuple[str, int, int, tuple[str, ...]]:
    """``(header, its estimate units, its stored token count, the path it names)`` for ``path``.

    A header is capped at ``cap`` tokens (a quarter of ``max_tokens``) in both counts, so every
    chunk keeps most of its room for text: the outermost titles are dropped first, then the one
    left is shortened. The path reported (and stored in the text) is the one the header names.
    """
    p = path
    while p:
        h = context_header(p)
        units = int(_char_weights(h).sum())
        if _units_to_tokens(units) <= cap:
            n = count_tokens_batch([h])[0]
            if n <= cap:
                return h, units, n, p
        if len(p) > 1:
            p = p[1:]
        else:
            t = p[0][: len(p[0]) * 2 // 3].rstrip()
            p = (t,) if t else ()
    return "", 0, 0, ()


def _contexts(paths: list[tuple[str, ...]], cap: int) -> dict[tuple[str, ...], tuple[str, int, int, tuple[str, ...]]]:
    """:func:`_context` of every distinct path of one document, with one weight pass and one
    token-count batch (a header ends with a blank line, so its weights do not depend on what
    precedes it and the headers can be weighed as one string)."""
    distinct = [p for p in dict.fromkeys(paths) if p]
    out: dict[tuple[str, ...], tuple[str, int, int, tuple[str, ...]]] = {(): ("", 0, 0, ())}
    if not distinct:
        return out
    headers = [context_header(p) for p in distinct]
    w = np.cumsum(_char_weights("".join(headers)))
    ends = np.cumsum([len(h) for h in headers]) - 1
    totals = w[ends].tolist()
    real = count_tokens_batch(headers)
    prev = 0
    for p, h, t, n in zip(distinct, headers, totals, real, strict=True):
        units, prev = int(t - prev), t
        if n <= cap and _units_to_tokens(units) <= cap:
            out[p] = (h, units, n, p)
        else:
            out[p] = _context(p, cap)  # over the cap: shortened (rare)
    return out


class _Doc:
    """One document being chunked: its text and prefix sums of token weights."""

    __slots__ = ("prefix", "tail", "text")

    def __init__(self, text: str):
        self.text = text
        w = _char_weights(text)
        prefix = np.empty(len(text) + 1, dtype=np.int64)
        prefix[0] = 0
        np.cumsum(w, out=prefix[1:])
        self.prefix = prefix
        # Where headings/markup with no content after them begin (they end the last chunk): no
        # boundary is put before them. Past the end when there are none.
        self.tail = len(text) + 1

    def units(self, a: int, b: int) -> int:
        """Exact weight of ``text[a:b]`` read on its own (fast when ``a`` follows whitespace)."""
        if a == 0 or self.text[a - 1].isspace():
            p = self.prefix
            return int(p[b] - p[a])
        return int(_char_weights(self.text[a:b]).sum())


# Defaults scale with max_tokens (English/reST runs ~3.4 characters per estimated token), so that
# natural boundaries stay within reach of the token bound. For max_tokens=512: target_chars=1792,
# min_chars=1024, tuned on the Django 5.0 -> 5.1 -> 5.2 docs (benchmarks/chunk_stats.py) for the
# fewest new chunk texts per upgrade with a mean chunk of >= 800 characters.
_TARGET_CHARS_PER_TOKEN = 3.5
_MIN_CHARS_PER_TOKEN = 2.0


class StructureChunker:
    """Structure-aware, content-defined, token-bounded chunker for Markdown and reST.

    Parameters
    ----------
    max_tokens:
        Hard upper bound on every chunk's :func:`count_tokens` estimate and on its stored count
        (``tokens.count_tokens_batch``).
    target_chars:
        Spacing of the content-defined boundaries in sections too long for one chunk: a boundary
        is a local maximum of the block hash over a window of radius ``target_chars // 2``
        characters, so boundaries are at least that far apart and (token bound permitting) about
        ``target_chars`` apart. Default: 3.5 characters per token of ``max_tokens`` (1792).
    min_chars:
        No content-defined boundary closer than this to the section's heading or end, so the
        first and last chunks of a long section are not slivers; forced boundaries keep at least
        half of it. Default: 2 characters per token of ``max_tokens`` (1024).

    The rules, and why they keep edits local:

    * every heading starts a chunk (a heading directly followed by another heading stays with
      it, so a heading never ends a chunk unless it ends the document): an edit never moves a
      boundary in another section;
    * a section that fits in ``max_tokens`` is one chunk: an edit in it changes that chunk only
      (or splits it, once it outgrows the bound);
    * in a longer section, a boundary after block ``i`` exists iff block ``i``'s hash beats the
      hash of every block ending within the radius and ``i`` is ``min_chars`` from the section's
      edges. That depends only on text within ``max(radius, min_chars)`` characters of the
      boundary, so after an edit boundaries resynchronise within that distance;
    * where consecutive boundaries are more than ``max_tokens`` apart, a boundary is forced after
      the highest-hash block that fits, so forced boundaries also tend to reappear after an edit;
    * a block and its more-indented continuation (a ``::`` paragraph and its literal block, a
      directive and its body, "For example:" and the fence after it) stay together when they fit.
    """

    def __init__(self, max_tokens: int = 512, target_chars: int | None = None, min_chars: int | None = None):
        if max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {max_tokens}")
        if target_chars is None:
            target_chars = round(max_tokens * _TARGET_CHARS_PER_TOKEN)
        if min_chars is None:
            min_chars = round(max_tokens * _MIN_CHARS_PER_TOKEN)
        if target_chars < 2:
            raise ValueError(f"target_chars must be >= 2, got {target_chars}")
        if min_chars < 0:
            raise ValueError(f"min_chars must be >= 0, got {min_chars}")
        self.max_tokens = max_tokens
        self.target_chars = target_chars
        self.min_chars = min_chars
        self._radius = target_chars // 2
        self._max_units = max_tokens * _UNIT
        # The bound is enforced in the stored token count too, so the tokenizer is part of the output.
        self.version = (
            f"{STRUCTURE_CHUNKER_VERSION}+{TOKEN_ESTIMATOR_VERSION}+{tokenizer_name()}"
            f"-max{max_tokens}-target{target_chars}-min{min_chars}"
        )

    def __repr__(self) -> str:
        return (
            f"StructureChunker(max_tokens={self.max_tokens}, target_chars={self.target_chars}, "
            f"min_chars={self.min_chars})"
        )

    # ---- public -----------------------------------------------------------------------------

    def chunk(self, text: str) -> list[Chunk]:
        """Chunk normalised text (``\\n`` line ends). Empty or whitespace-only text gives ``[]``."""
        base = front_matter_end(text)  # the one front-matter rule (rag_assets/front_matter.py)
        if _NON_SPACE.search(text, base) is None:
            return []
        doc = _Doc(text)
        padded = "\n" + text
        markdown = _looks_like_markdown(padded, base)
        fences = _find_fences(padded, base) if markdown else []
        headings = _find_headings(text, padded, base, markdown, fences)
        sections, doc.tail = _sections(text, base, headings, markdown, fences)
        contexts = _contexts([sec.path for sec in sections], self.max_tokens // 4)

        # Each section's weight from one numpy gather; its budget is the bound less its header's.
        extents = [p for s in sections for p in (s.start, s.end)]
        vals = doc.prefix[np.array(extents, dtype=np.int64)].tolist()
        planned: list[tuple[_Section, tuple, list[tuple[int, int]]]] = []
        for k, sec in enumerate(sections):
            context = contexts[sec.path]
            units = self._max_units - context[1]
            spans: list[tuple[int, int]] = []
            if vals[2 * k + 1] - vals[2 * k] <= units:
                spans.append((sec.start, sec.end))  # the whole section fits: one chunk
            else:
                self._long_section(doc, sec.heading, _blocks(text, sec.content_start, sec.end, fences), spans, units)
            planned.append((sec, context, spans))
        # The stored (cl100k) count of every planned chunk in one batch: most fit as they are.
        counts = count_tokens_batch([c[0] + text[a:b] for _, c, spans in planned for a, b in spans])
        chunks: list[Chunk] = []
        at = 0
        for sec, (ctx, ctx_units, ctx_tokens, path), spans in planned:
            n = counts[at : at + len(spans)]
            at += len(spans)
            if max(n) > self.max_tokens:
                spans = self._fit_stored_count(
                    doc, spans, {sec.start: sec.heading} if sec.heading else {}, fences, ctx, ctx_tokens, n
                )
            for a, b in spans:
                piece = ctx + text[a:b]
                chunks.append(
                    Chunk(
                        len(chunks),
                        piece,
                        a,
                        b,
                        chunk_hash(piece),
                        max(1, _units_to_tokens(ctx_units + doc.units(a, b))),
                        path,
                        ctx,
                    )
                )
        return chunks

    # ---- the bound in the stored token count ---------------------------------------------------

    def _fit_stored_count(
        self,
        doc: _Doc,
        spans: list[tuple[int, int]],
        heading_at: dict[int, tuple[int, int]],
        fences: list[tuple[int, int]],
        ctx: str = "",
        ctx_tokens: int = 0,
        counts: list[int] | None = None,
    ) -> list[tuple[int, int]]:
        """Enforce ``max_tokens`` in the count the index stores (``tokens.count_tokens_batch``:
        cl100k_base, or this module's estimate without it), not only in the estimate.

        The estimate is ~15% high on prose but can be 2x low on text BPE splits finely (strings
        without spaces, rare scripts, punctuation runs), and a chunk's real count is not the sum of
        its pieces' counts. Spans over the bound are chunked again on their own with a bound scaled
        down by how much the estimate missed, then, failing that, cut by the real count. Only text
        inside an over-long span is involved, so edit locality elsewhere is unchanged. The bound
        holds for the stored text, ``ctx`` (the section's header, ``ctx_tokens`` tokens) + slice.
        """
        if counts is None:  # (the stored counts of ``spans``, when the caller has them)
            counts = count_tokens_batch([ctx + doc.text[a:b] for a, b in spans])
        if not counts or max(counts) <= self.max_tokens:
            return spans
        bound = self.max_tokens - ctx_tokens  # the header's tokens come off every piece's budget
        out: list[tuple[int, int]] = []
        refitted: list[int] = []
        for (a, b), n in zip(spans, counts, strict=True):
            if n <= self.max_tokens:
                out.append((a, b))
            else:
                k = len(out)
                self._refit(doc, a, b, heading_at.get(a), max(1, n - ctx_tokens), fences, out, 0, bound)
                refitted.extend(range(k, len(out)))
        if not ctx or not refitted:
            return out
        # BPE counts are not additive: make sure header + piece fits too, cutting tighter if not.
        for _ in range(4):
            full = count_tokens_batch([ctx + doc.text[out[i][0] : out[i][1]] for i in refitted])
            bad = {i: n for i, n in zip(refitted, full, strict=True) if n > self.max_tokens}
            if not bad:
                break
            fixed: list[tuple[int, int]] = []
            refitted = []
            for i, (a, b) in enumerate(out):
                if i in bad:
                    k = len(fixed)
                    _cut_to_fit(doc.text, a, b, max(4, bound - (bad[i] - self.max_tokens) - 1), fixed)
                    refitted.extend(range(k, len(fixed)))
                else:
                    fixed.append((a, b))
            out = fixed
        return out

    def _refit(
        self,
        doc: _Doc,
        a: int,
        b: int,
        heading: tuple[int, int] | None,
        n_real: int,
        fences: list[tuple[int, int]],
        out: list[tuple[int, int]],
        depth: int,
        max_tokens: int | None = None,
    ) -> None:
        """Append spans covering ``text[a:b]`` (``n_real`` stored tokens, over the bound) that fit
        ``max_tokens`` (default the chunker's; less the header's tokens under a heading path)."""
        mt = self.max_tokens if max_tokens is None else max_tokens
        text = doc.text
        if heading is not None and b <= heading[1]:
            heading = None
        units = doc.units(a, b)
        limit = min(units - 1, units * mt // n_real - _UNIT)
        sub: list[tuple[int, int]] = []
        if depth < 4 and limit >= 4 * _UNIT:
            inner = [f for f in fences if a <= f[0] and f[1] <= b]
            self._long_section(
                doc, heading, _blocks(text, heading[1] if heading else a, b, inner), sub, limit
            )
        if len(sub) < 2:
            _cut_to_fit(text, a, b, mt, out)
            return
        counts = count_tokens_batch([text[x:y] for x, y in sub])
        for (x, y), m in zip(sub, counts, strict=True):
            if m <= mt:
                out.append((x, y))
            else:
                self._refit(doc, x, y, heading if x == a else None, m, fences, out, depth + 1, mt)

    # ---- a section too long for one chunk -------------------------------------------------------

    def _long_section(
        self,
        doc: _Doc,
        heading: tuple[int, int] | None,
        blocks: list[list],
        out: list[tuple[int, int]],
        max_units: int | None = None,
    ) -> None:
        """Append the chunk spans of a section that does not fit in one chunk (``max_units``:
        the estimate bound per chunk, ``max_tokens`` by default)."""
        max_units = self._max_units if max_units is None else max_units
        if heading is not None and not blocks:
            blocks, heading = [[heading[0], heading[1], 0, False]], None  # a giant lone heading
        wanted = [p for blk in blocks for p in (blk[0], blk[1])]
        if heading is not None:
            wanted += heading
        at = dict(zip(wanted, doc.prefix[np.array(wanted, dtype=np.int64)].tolist(), strict=True))
        limit = max_units
        if heading is not None:
            # Reserve room for the heading (and the blank after it) in every unit, so the heading
            # always fits with the unit that follows it and never ends a chunk on its own.
            head_units = at[blocks[0][0]] - at[heading[0]]
            if head_units * 2 > limit:
                # A pathological giant heading: chunk it like any other block.
                blocks = [[heading[0], heading[1], 0, False], *blocks]
                heading = None
            else:
                limit -= head_units
        k = len(blocks)
        while k and blocks[k - 1][0] >= doc.tail:
            k -= 1
        tail_units = at[blocks[-1][1]] - at[blocks[k][0]] if 0 < k < len(blocks) else 0
        if tail_units and tail_units * 2 <= limit:
            # Headings/markup ending the document stay with the last content: its last unit is
            # made small enough to take them.
            items = self._items(doc, at, blocks[:k], limit - tail_units)
            s0 = items[-1][0]
            items[-1] = (s0, blocks[-1][1], doc.units(s0, blocks[-1][1]))
        else:
            items = self._items(doc, at, blocks, limit)
        self._pack(doc, at, heading, items, out, max_units)

    def _items(
        self, doc: _Doc, at: dict[int, int], blocks: list[list], limit: int
    ) -> list[tuple[int, int, int]]:
        """Units to pack, ``(start, end, units)``, each within ``limit``.

        A block and the more-indented blocks after it (a reST literal block under its ``::``
        paragraph, a directive's body, a nested list) stay one unit when they fit together;
        otherwise the head block is a unit and its children are grouped the same way, one level
        down. Blocks that alone exceed the limit are split.
        """
        n = len(blocks)
        # next_le[k]: the first block after k indented no deeper than k (the end of k's group).
        next_le = [n] * n
        stack: list[int] = []
        for k in range(n):
            ind = blocks[k][2]
            while stack and blocks[stack[-1]][2] >= ind:
                next_le[stack.pop()] = k
            stack.append(k)
        items: list[tuple[int, int, int]] = []
        work = [(0, n)]
        while work:
            k, j = work.pop()
            if k >= j:
                continue
            g = next_le[k] if next_le[k] < j else j
            bs, be, _, code = blocks[k]
            if g == k + 1 < j and not code and _introduces_next(doc.text[bs:be]):
                # "For example:" followed by a fence at the same indentation: keep them together.
                g2 = next_le[g] if next_le[g] < j else j
                e = blocks[g2 - 1][1]
                u = at[e] - at[bs]
                if u <= limit:
                    items.append((bs, e, u))
                    work.append((g2, j))
                    continue
            work.append((g, j))
            e = blocks[g - 1][1]
            u = at[e] - at[bs]
            if u <= limit:
                items.append((bs, e, u))
                continue
            bu = at[be] - at[bs]
            if bu <= limit:
                items.append((bs, be, bu))
            else:
                _split(doc, bs, be, limit, _CODE_LEVELS if code else _PROSE_LEVELS, items)
            work.append((k + 1, g))
        return items

    def _pack(
        self,
        doc: _Doc,
        at: dict[int, int],
        heading: tuple[int, int] | None,
        items: list[tuple[int, int, int]],
        out: list[tuple[int, int]],
        max_units: int,
    ) -> None:
        """Group a long section's items into chunks of at most ``max_units``.

        Natural boundaries: after item ``i`` when its hash is a strict local maximum over the items
        ending within ``radius`` characters, at least ``min_chars`` from the section's edges.
        Where the next item would push a chunk over the token bound, the boundary is forced; it is
        put after the highest-hash item of the chunk so far (leaving at least ``min_chars // 2``
        characters), not simply before the overflowing item, so that after an edit the forced
        boundaries too tend to land where they were before.
        """
        text = doc.text
        n = len(items)
        sec_start = heading[0] if heading is not None else items[0][0]
        sec_end = items[-1][1]
        radius = self._radius

        ends = [it[1] for it in items]
        raw = [0] * n  # 0: never a boundary unless nothing else is possible
        intro = [False] * n  # the item introduces the next one (markup, "Example:")
        for i in range(n - 1):
            piece = text[items[i][0] : ends[i]]
            intro[i] = _introduces_next(piece) or _is_markup_text(piece)
            if not intro[i] and items[i + 1][0] < doc.tail:
                raw[i] = _cut_hash(piece) | 1
        # A cut after item i would strand the introducing items from i+1 on: they could not fit
        # together with the item they introduce.
        strands = [False] * n
        run, j = 0, n  # the units of the introducing run starting at i+1; j: the item after it
        for i in range(n - 2, -1, -1):
            if intro[i + 1]:
                run += items[i + 1][2]
            else:
                run, j = 0, i + 1
            strands[i] = intro[i + 1] and j < n and run + items[j][2] > max_units
        lo, hi = sec_start + self.min_chars, sec_end - self.min_chars
        hashes = [h if lo <= e <= hi else 0 for h, e in zip(raw, ends, strict=True)]

        natural = [False] * n
        for i in range(n - 1):
            h = hashes[i]
            if not h:
                continue
            p = ends[i]
            j = i - 1
            ok = True
            while j >= 0 and p - ends[j] <= radius:
                if hashes[j] >= h:
                    ok = False
                    break
                j -= 1
            if ok:
                j = i + 1
                while j < n and ends[j] - p <= radius:
                    if hashes[j] >= h:
                        ok = False
                        break
                    j += 1
            natural[i] = ok and not strands[i]

        min_forced = self.min_chars // 2
        prefix = doc.prefix
        pe_of = []
        for _, e, _ in items:
            pe = at.get(e)
            pe_of.append(int(prefix[e]) if pe is None else pe)
        # The chunk being built starts at `a` with item `first`; its weight is
        # base_units + P(end) - base_pe.
        if heading is not None:
            a, first = heading[0], 0
            base_units, base_pe = at[heading[1]] - at[heading[0]], at[heading[1]]
        else:
            a, first, base_units, base_pe = -1, 0, 0, 0
        i = 0
        while i < n:
            if a < 0:
                a, first, base_units, base_pe = items[i][0], i, items[i][2], pe_of[i]
            elif base_units + pe_of[i] - base_pe > max_units:
                # Forced: cut after the highest-hash item that leaves a real chunk on both sides
                # (or at least on this side); failing that, right before the overflowing item.
                best, best_key = i - 1, (-1, -1)
                for m in range(first, i):
                    if ends[m] - a >= min_forced and not strands[m]:
                        key = (sec_end - ends[m] >= min_forced, raw[m])
                        if key > best_key:
                            best, best_key = m, key
                if best < first:  # cannot happen: units were sized to fit after the heading
                    out.append((a, heading[1] if heading is not None and first == 0 else ends[i - 1]))
                    best = i - 1
                else:
                    out.append((a, ends[best]))
                i = best + 1
                a, first, base_units, base_pe = items[i][0], i, items[i][2], pe_of[i]
            if natural[i]:
                out.append((a, ends[i]))
                a = -1
            i += 1
        if a >= 0:
            out.append((a, ends[-1]))


def _split(
    doc: _Doc,
    s: int,
    e: int,
    limit: int,
    levels: tuple[re.Pattern[str], ...],
    out: list[tuple[int, int, int]],
) -> None:
    """Split ``text[s:e]`` (too big for ``limit``) at the first level's split points, recursing
    into pieces that are still too big. The pieces are then packed like blocks, so the boundaries
    inside one long paragraph are content-defined too."""
    if not levels:
        _hard_split(doc, s, e, limit, out)
        return
    text = doc.text
    cuts = [m.end() for m in levels[0].finditer(text, s, e)]
    cuts.append(e)
    pieces: list[tuple[int, int]] = []
    pos = s
    for c in cuts:
        if c <= pos:
            continue
        raw = text[pos:c]
        core = raw.strip()
        if core:
            a = pos + len(raw) - len(raw.lstrip())
            pieces.append((a, a + len(core)))
        pos = c
    if len(pieces) <= 1:
        _split(doc, s, e, limit, levels[1:], out)
        return
    for a, b in pieces:
        u = doc.units(a, b)
        if u <= limit:
            out.append((a, b, u))
        else:
            _split(doc, a, b, limit, levels[1:], out)


_HARD_MARGIN = 32  # a slice that starts mid-word weighs at most this much more than its prefix-sum span


def _hard_split(doc: _Doc, s: int, e: int, limit: int, out: list[tuple[int, int, int]]) -> None:
    """Last resort for text with no whitespace: cut at characters, as long as the bound allows."""
    prefix = doc.prefix
    a = s
    while a < e:
        target = int(prefix[a]) + max(limit - _HARD_MARGIN, _UNIT)
        b = int(np.searchsorted(prefix, target, side="right")) - 1
        b = min(max(b, a + 1), e)
        u = doc.units(a, b)
        while u > limit and b > a + 1:  # cannot happen given the margin; kept as a guarantee
            b = a + max(1, (b - a) * 3 // 4)
            u = doc.units(a, b)
        out.append((a, b, u))
        a = b


def _fits(piece: str, max_tokens: int) -> bool:
    """Within the bound both in the estimate and in the stored count."""
    return count_tokens(piece) <= max_tokens and count_tokens_batch([piece])[0] <= max_tokens


def _cut_to_fit(text: str, a: int, b: int, max_tokens: int, out: list[tuple[int, int]]) -> None:
    """Last resort: cut ``text[a:b]`` (trimmed) greedily into the longest trimmed pieces that fit
    :func:`_fits`, each ending at whitespace when that keeps at least half of the piece.

    BPE counts are not monotone in the prefix length, so the binary search only ever keeps an end
    it has checked; a single character always fits (at most 4 tokens, ``max_tokens >= 16``).
    """
    while a < b and text[a].isspace():
        a += 1
    while a < b:
        if _fits(text[a:b], max_tokens):
            out.append((a, b))
            return
        lo, hi = a + 1, b - 1  # text[a:lo] fits; text[a:b] does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _fits(text[a:mid].rstrip(), max_tokens):
                lo = mid
            else:
                hi = mid - 1
        end = a + len(text[a:lo].rstrip())
        half = a + (end - a) // 2
        k = end - 1
        while k > half and not text[k].isspace():
            k -= 1
        if k > half:
            cut = a + len(text[a:k].rstrip())
            if cut > a and _fits(text[a:cut], max_tokens):
                end = cut
        out.append((a, end))
        a = end
        while a < b and text[a].isspace():
            a += 1


_WORD_WINDOW_CACHE: dict[int, re.Pattern[str]] = {}


class FixedWindowChunker:
    """The naive baseline: consecutive windows of ``words`` whitespace-separated words, no overlap.

    Kept for comparison only. Inserting one word near the top shifts every later window, so an
    edit re-embeds everything after it; windows also ignore headings. Only with ``max_tokens``
    (as :func:`make_chunker` builds it for the pipeline) is a window over that many tokens cut.
    """

    def __init__(self, words: int = 512, max_tokens: int | None = None):
        if words < 1:
            raise ValueError(f"words must be >= 1, got {words}")
        if max_tokens is not None and max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {max_tokens}")
        self.words = words
        self.max_tokens = max_tokens
        if max_tokens is None:
            self.version = FIXED_CHUNKER_VERSION if words == 512 else f"fixed{words}-v1"
        else:  # windows over the bound are cut, by the stored count: the tokenizer is part of the output
            self.version = f"fixed{words}-max{max_tokens}+{TOKEN_ESTIMATOR_VERSION}+{tokenizer_name()}-v2"
        pat = _WORD_WINDOW_CACHE.get(words)
        if pat is None:
            pat = re.compile(rf"\S+(?:\s+\S+){{0,{words - 1}}}")
            _WORD_WINDOW_CACHE[words] = pat
        self._window = pat

    def __repr__(self) -> str:
        return f"FixedWindowChunker(words={self.words}, max_tokens={self.max_tokens})"

    def chunk(self, text: str) -> list[Chunk]:
        """Windows of ``words`` words over the text after any front matter; with ``max_tokens``,
        a window over it (estimated or stored count) is cut into pieces that fit."""
        base = front_matter_end(text)  # the one front-matter rule (rag_assets/front_matter.py)
        spans = [m.span() for m in self._window.finditer(text, base)]
        if self.max_tokens is not None and spans:
            mt = self.max_tokens
            real = count_tokens_batch([text[a:b] for a, b in spans])
            fitted: list[tuple[int, int]] = []
            for (a, b), n in zip(spans, real, strict=True):
                if n <= mt and count_tokens(text[a:b]) <= mt:
                    fitted.append((a, b))
                else:
                    _cut_to_fit(text, a, b, mt, fitted)
            spans = fitted
        chunks: list[Chunk] = []
        for a, b in spans:
            piece = text[a:b]
            chunks.append(Chunk(len(chunks), piece, a, b, chunk_hash(piece), count_tokens(piece)))
        return chunks


def make_chunker(name: str, max_tokens: int = 512) -> Chunker:
    """The chunker called ``name``: ``"structure"`` (default pipeline) or ``"fixed"`` (baseline).

    ``max_tokens`` bounds every chunk of either; the fixed window is 512 words, cut further where a
    window is over ``max_tokens``.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "structure":
        return StructureChunker(max_tokens=max_tokens)
    if key == "fixed":
        return FixedWindowChunker(max_tokens=max_tokens)
    raise ValueError(f"unknown chunker {name!r}: expected 'structure' or 'fixed'")
