"""Reads never leave the source folder, and a file being written is not indexed half-written."""

from __future__ import annotations

import os

import pytest

from rag_assets.pipeline import Indexer
from rag_assets.safe_open import NotRegular, UnsafePath, read_under
from rag_assets.sources import DocumentChanging, DocumentError, FolderSource
from tests.helpers import write


@pytest.fixture
def outside(tmp_path):
    secret = tmp_path / "outside"
    write(secret / "notes" / "a.md", "# Secret\n\nnot part of the corpus")
    return secret


def test_a_component_swapped_for_a_symlink_after_the_scan_is_not_followed(tmp_path, outside):
    root = tmp_path / "docs"
    write(root / "notes" / "a.md", "# Public\n\nfine")
    src = FolderSource(root, ("**/*.md",))
    scan = src.scan()
    assert "notes/a.md" in scan.stats
    # between the scan and the read: the folder becomes a link to a folder outside the root
    os.rename(root / "notes", tmp_path / "moved")
    os.symlink(outside / "notes", root / "notes")
    with pytest.raises(DocumentError, match="not a plain folder"):
        src.read("notes/a.md")
    # the file itself swapped for a link
    os.unlink(root / "notes")
    (root / "notes").mkdir()
    os.symlink(outside / "notes" / "a.md", root / "notes" / "a.md")
    with pytest.raises(DocumentError, match="symbolic link"):
        src.read("notes/a.md")


def test_read_under_refuses_non_canonical_paths_and_fifos(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    for bad in ("../x", "a//b", "./a", "a/", ""):
        with pytest.raises(UnsafePath):
            read_under(root, bad, 100)
    os.mkfifo(root / "pipe.md")
    with pytest.raises(NotRegular):
        read_under(root, "pipe.md", 100)  # returns at once: a FIFO cannot hang the run


def test_a_file_changed_since_the_scan_is_deferred_not_indexed_half_written(settings, docs_dir):
    write(docs_dir / "a.md", "# A\n\nfirst complete version.")
    write(docs_dir / "b.md", "# B\n\nsteady.")
    idx = Indexer(settings)
    try:
        idx.refresh(docs_dir)
        src = FolderSource(docs_dir, settings.include)
        st = src.scan().stats["a.md"]
        with open(docs_dir / "a.md", "a") as f:  # a writer appends after our scan
            f.write("\n\nhalf of the second")
        with pytest.raises(DocumentChanging, match="being written"):
            src.read("a.md", st)

        class WriterBusy(FolderSource):
            """A writer appends to a.md right after each scan (a copy still in progress)."""

            def scan(self):
                res = super().scan()
                with open(docs_dir / "a.md", "a") as f:
                    f.write(" more")
                return res

        idx.source = lambda path=None, change_source=False: WriterBusy(docs_dir, settings.include)
        rep = idx.refresh(docs_dir)
        assert [e["doc_id"] for e in rep.errors] == ["a.md"] and "being written" in rep.errors[0]["error"]
        text = idx.conn.execute("SELECT string_agg(text, ' ') FROM items WHERE doc_id = 'a.md'").fetchone()[0]
        assert "first complete version" in text and "half of the second" not in text  # last good version
        del idx.source
        rep = idx.refresh(docs_dir)  # the writer is done: the next run reads the whole file
        assert rep.errors == [] and rep.docs_modified == 1
        text = idx.conn.execute("SELECT string_agg(text, ' ') FROM items WHERE doc_id = 'a.md'").fetchone()[0]
        assert "half of the second more" in text
    finally:
        idx.close()


def test_control_characters_in_file_names_never_reach_the_terminal_raw(tmp_path, db_url):
    import subprocess
    import sys

    docs = tmp_path / "docs"
    write(docs / "ok.md", "# ok\n\nfine")
    evil = "evil\x1b[2J\x07name.md"
    (docs / evil).write_bytes(b"\xff\xfe not utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "DAGSTER_"))}
    env.update(RAG_HOME=str(tmp_path / "home"), RAG_DATABASE_URL=db_url, RAG_SHARDS="4")
    p = subprocess.run(
        [sys.executable, "-m", "rag_assets.cli", "index", str(docs), "--core"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stderr + p.stdout and "\x07" not in p.stderr + p.stdout
    assert "evil\\x1b[2J\\x07name.md" in p.stderr
