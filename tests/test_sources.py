"""Folder source: normalisation, metadata, globs and bad input (real files in a temp folder)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from rag_assets.sources import (
    DocumentError,
    DocumentGone,
    FolderSource,
    first_heading,
    make_document,
    split_front_matter,
)


def test_bom_and_crlf_are_normalised_so_hashes_match():
    a = make_document("a.md", "\ufeff# T\r\n\r\nbody\r\n".encode(), 0, 1 << 20)
    b = make_document("a.md", b"# T\n\nbody\n", 0, 1 << 20)
    assert a.text == b.text == "# T\n\nbody\n"
    assert a.content_hash == b.content_hash


def test_front_matter_becomes_metadata_and_is_not_body():
    doc = make_document(
        "g.md",
        b"---\ntitle: Guide\ntags: [a, b]\ndate: 2024-01-02\npath: evil\n---\n# Heading\n\ntext\n",
        0,
        1 << 20,
    )
    assert doc.text.startswith("# Heading")
    assert doc.metadata["title"] == "Guide"
    assert doc.metadata["tags"] == ["a", "b"]
    assert doc.metadata["date"] == "2024-01-02"
    assert doc.metadata["path"] == "g.md"  # reserved keys cannot be overridden


def test_metadata_only_change_keeps_content_hash():
    a = make_document("g.md", b"---\ntags: [a]\n---\nbody\n", 0, 1 << 20)
    b = make_document("g.md", b"---\ntags: [b]\n---\nbody\n", 0, 1 << 20)
    assert a.content_hash == b.content_hash
    assert a.meta_hash != b.meta_hash


def test_broken_front_matter_names_the_document():
    with pytest.raises(DocumentError, match=r"bad\.md: invalid YAML front matter"):
        split_front_matter("---\ntitle: [unclosed\n---\nbody", "bad.md")


@pytest.mark.parametrize(
    "text,title",
    [
        ("# Hello\n\nx", "Hello"),
        ("intro\n\nTitle here\n==========\n\nx", "Title here"),
        ("=====\nOver\n=====\n\nx", "Over"),
        ("Setext\n------\n", "Setext"),
        ("no heading at all", None),
    ],
)
def test_first_heading(text, title):
    assert first_heading(text) == title


def test_title_falls_back_to_file_stem():
    assert make_document("dir/notes.txt", b"plain text", 0, 100).metadata["title"] == "notes"


def test_binary_invalid_utf8_and_too_large_are_clear_errors():
    with pytest.raises(DocumentError, match=r"img\.md: binary file"):
        make_document("img.md", b"\x89PNG\x00\x00", 0, 100)
    with pytest.raises(DocumentError, match=r"latin\.md: not valid UTF-8"):
        make_document("latin.md", "café".encode("latin-1"), 0, 100)
    with pytest.raises(DocumentError, match=r"big\.md: document too large"):
        make_document("big.md", b"x" * 101, 0, 100)


def test_empty_document_is_valid():
    doc = make_document("empty.md", b"", 0, 100)
    assert doc.text == "" and doc.metadata["size"] == 0


def test_scan_applies_globs_and_skips_dirs_and_symlinks(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "a.md").write_text("a")
    (tmp_path / "sub" / "b.rst").write_text("b")
    (tmp_path / "sub" / "deep" / "c.md").write_text("c")
    (tmp_path / "sub" / "skip.md").write_text("s")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden.md").write_text("h")
    os.symlink("/etc/passwd", tmp_path / "link.md")
    src = FolderSource(tmp_path, include=["**/*.md", "**/*.rst"], exclude=["sub/skip.md"])
    res = src.scan()
    assert sorted(res.stats) == [".hidden.md", "a.md", "sub/b.rst", "sub/deep/c.md"]
    assert res.stats["a.md"].size == 1


def test_hostile_names_are_plain_ids(tmp_path):
    names = ['it\'s "quoted".md', "..dots..md", "spa ce.md", "ünïcødé 文書.md", "semi;colon.md"]
    for n in names:
        (tmp_path / n).write_text(f"# {n}\n\nbody")
    src = FolderSource(tmp_path, include=["**/*.md"])
    stats = src.scan().stats
    assert sorted(stats) == sorted(names)
    for n in names:
        assert src.read(n).metadata["path"] == n


def test_non_utf8_file_name_is_reported_not_fatal(tmp_path):
    bad = os.fsencode(tmp_path) + b"/bad\xff.md"
    with open(bad, "wb") as f:
        f.write(b"x")
    (tmp_path / "good.md").write_text("g")
    res = FolderSource(tmp_path, include=["**/*.md"]).scan()
    assert list(res.stats) == ["good.md"]
    assert len(res.errors) == 1 and "not valid UTF-8" in res.errors[0][1]


def test_read_of_deleted_file_is_gone(tmp_path):
    src = FolderSource(tmp_path, include=["**/*.md"])
    with pytest.raises(DocumentGone):
        src.read("missing.md")


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="source folder does not exist"):
        FolderSource(tmp_path / "nope").scan()


# --- one front-matter parser (rag_assets/front_matter.py) -------------------------------------

FM_EDGE = [
    "---\ntitle: a\n---\n# H\n\nBody.\n",
    "--- \t\ntitle: a\n--- \t\nBody after spaces.\n",
    "---\ntitle: a\n...\nBody after dots.\n",
    "---\ntitle: a\n\nunterminated body.\n",
    "---\nTitle\n---\n\nreST body.\n",
    "---\n- a\n- b\n---\nlist block body.\n",
    "---\n---\nempty block body.\n",
    "\ufeff---\ntitle: a\n---\nBOM body.\n",
    "---\r\ntitle: a\r\n---\r\nCRLF body.\r\n",
    "---\ntitle: a\n---",
    "---\na: 1\n---\n---\nb: 2\n---\nsecond block body.\n",
    "intro\n---\ntitle: a\n---\nlate block.\n",
    "---\x0c\ntitle: a\n---\nform feed opener.\n",
]


def _chunk_digest(root) -> str:
    """Every chunk (id inputs: doc, seq, hash, span) of both chunkers over the sample corpus read
    through the folder source's text path, plus the edge cases given to the chunkers directly."""
    import hashlib
    from pathlib import Path

    from rag_assets.chunking import FixedWindowChunker, StructureChunker

    h = hashlib.sha256()
    chunkers = [StructureChunker(), FixedWindowChunker(max_tokens=512)]
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        try:
            doc = make_document(rel, p.read_bytes(), 0, 10 << 20)
        except DocumentError as e:
            h.update(f"{rel}\0error\0{e.reason}\n".encode())
            continue
        for c in chunkers:
            for ch in c.chunk(doc.text):
                h.update(f"{rel}\0{ch.seq}\0{ch.chunk_hash}\0{ch.start}\0{ch.end}\n".encode())
    for i, t in enumerate(FM_EDGE):
        for c in chunkers:
            for ch in c.chunk(t):
                h.update(f"edge{i}\0{ch.seq}\0{ch.chunk_hash}\0{ch.start}\0{ch.end}\n".encode())
    return h.hexdigest()


def test_chunks_are_unchanged_by_the_shared_front_matter_parser():
    """The digest was computed with the two parsers of the previous release (the chunker's own
    ``_front_matter_end``): chunk ids and spans are the same, so the chunker versions stay."""
    from pathlib import Path

    from rag_assets.chunking import FIXED_CHUNKER_VERSION, STRUCTURE_CHUNKER_VERSION

    root = Path(__file__).resolve().parent.parent / "samples" / "corpus"
    # structure-v3 (heading-path headers, no heading/markup-only chunks) changed the digest by design
    # (was ad1ee35e... under structure-v2); a change here without a version bump is a bug
    assert _chunk_digest(root) == "e7b836baee3c583f3b4d159feb98848495cc7fb7468a7ebe3f4f8efdb41a73c7"
    assert (STRUCTURE_CHUNKER_VERSION, FIXED_CHUNKER_VERSION) == ("structure-v3", "fixed512-v1")


@pytest.mark.parametrize(
    "raw,meta,body",
    [
        # a BOM is removed before the rules apply, so it never hides a block
        ("\ufeff---\ntitle: T\n---\nbody\n", {"title": "T"}, "body\n"),
        # spaces and tabs after the opening and closing lines
        ("--- \t\na: 1\n--- \t\nbody\n", {"a": 1}, "body\n"),
        # CRLF and CR line ends are normalised first
        ("---\r\na: 1\r\n---\r\nbody\r\n", {"a": 1}, "body\n"),
        ("---\ra: 1\r---\rbody", {"a": 1}, "body"),
        # "..." closes a block too
        ("---\na: 1\n...\nbody\n", {"a": 1}, "body\n"),
        # unterminated: no front matter, nothing lost
        ("---\na: 1\n\nbody\n", {}, "---\na: 1\n\nbody\n"),
        # an empty block is empty metadata
        ("---\n---\nbody", {}, "body"),
        # a block at the very end, with no line end after it
        ("---\na: 1\n---", {"a": 1}, ""),
        # a block further down is body text
        ("intro\n---\na: 1\n---\n", {}, "intro\n---\na: 1\n---\n"),
        # a reST over- and underlined title is not front matter (it was an error before)
        ("---\nTitle\n---\n\nBody.\n", {}, "---\nTitle\n---\n\nBody.\n"),
    ],
)
def test_front_matter_rules_on_edge_cases(raw, meta, body):
    from rag_assets.chunking import StructureChunker
    from rag_assets.front_matter import front_matter_end

    doc = make_document("e.md", raw.encode(), 0, 1 << 20)
    assert {k: v for k, v in doc.metadata.items() if k not in ("title", "path", "size", "mtime")} == {
        k: v for k, v in meta.items() if k != "title"
    }
    if "title" in meta:
        assert doc.metadata["title"] == meta["title"]
    assert doc.text == body
    # the chunker skips exactly what the source took as front matter: the body has none left
    assert front_matter_end(doc.text) == 0
    chunks = StructureChunker().chunk(doc.text)
    assert "".join(c.text for c in chunks).replace("\n", "").replace(" ", "") == "".join(body.split())


def test_rest_title_block_gives_the_title():
    doc = make_document("page.rst", b"---\nThe Title\n---\n\nBody.\n", 0, 1 << 20)
    assert doc.metadata["title"] == "The Title"


@pytest.mark.parametrize("name", ["notes.txt", "page.rst", "page.md"])
def test_front_matter_is_read_in_every_text_format(name):
    doc = make_document(name, b"---\ntags: [x]\n---\nBody.\n", 0, 1 << 20)
    assert doc.metadata["tags"] == ["x"] and doc.text == "Body.\n"


def test_a_block_that_is_yaml_but_not_a_mapping_is_an_error():
    with pytest.raises(DocumentError, match=r"l\.md: front matter must be a YAML mapping"):
        make_document("l.md", b"---\n- a\n- b\n---\nbody\n", 0, 1 << 20)


def test_source_metadata_wins_over_front_matter():
    from rag_assets.sources import FileStat, RawDocument, document_from_raw

    raw = RawDocument(
        "a.md", b"---\netag: forged\nowner: me\n---\nbody", "text/markdown", FileStat(4, 0, "e1"),
        {"etag": "e1", "uri": "s3://b/a.md"},
    )
    doc = document_from_raw(raw, 1 << 20)
    assert doc.metadata["etag"] == "e1" and doc.metadata["uri"] == "s3://b/a.md"
    assert doc.metadata["owner"] == "me"


_FM_TEXT = st.text(alphabet=st.sampled_from(list("-.: \tab#\n=")), max_size=40)


@hsettings(max_examples=400, deadline=None)
@given(prefix=st.sampled_from(["", "---\n", "--- \n", "---\na: 1\n", "---\nTitle\n"]), rest=_FM_TEXT)
def test_property_source_body_is_what_the_chunker_skips_to(prefix, rest):
    """One rule: whenever the source accepts a text, its body is the text after the block the
    chunker skips; and a text the chunker keeps whole is all body for the source."""
    from rag_assets.front_matter import front_matter_end

    text = prefix + rest
    try:
        _front, body = split_front_matter(text, "p.md")
    except DocumentError:
        assert front_matter_end(text) > 0  # only a block can be refused
        return
    assert body == text[front_matter_end(text) :]
