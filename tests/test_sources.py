"""Folder source: normalisation, metadata, globs and bad input (real files in a temp folder)."""

from __future__ import annotations

import os

import pytest

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
