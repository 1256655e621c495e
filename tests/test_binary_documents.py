"""PDF, Office and HTML documents through the whole pipeline (folder source → converters → parse
cache → chunks → vectors), with real files other projects publish (tests/data/formats/SOURCES.md)."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from rag_assets.pipeline import Indexer
from rag_assets.settings import BINARY_INCLUDE, DEFAULT_INCLUDE
from rag_assets.store.db import connect_index

DATA = Path(__file__).parent / "data" / "formats"
FILES = {
    "manual.pdf": "pdflatex-outline.pdf",
    "crazyones.pdf": "crazyones.pdf",
    "report.docx": "blk-paras-and-tables.docx",
    "deck.pptx": "test.pptx",
    "sheet.xlsx": "founders.xlsx",
    "json.html": "python-3.11-library-json.html",
    "scan.pdf": "imagemagick-CCITTFaxDecode.pdf",  # an image-only page: no text layer
    "locked.pdf": "encrypted-file.pdf",
}


def _refresh(settings):
    idx = Indexer(settings)
    try:
        rep = idx.refresh(settings.source_path)
        return rep, idx.ctx.converter.stats if idx.ctx.converter else None
    finally:
        idx.close()


def test_binary_documents_are_converted_once_and_bad_ones_reported(settings):
    s = replace(settings, include=DEFAULT_INCLUDE + BINARY_INCLUDE)
    s.source_path.mkdir(parents=True, exist_ok=True)
    for name, src in FILES.items():
        shutil.copy(DATA / src, s.source_path / name)
    rep, stats = _refresh(s)
    errors = {e["doc_id"]: e["error"] for e in rep.errors}
    assert set(errors) == {"scan.pdf", "locked.pdf"}, errors
    assert "no text layer" in errors["scan.pdf"] and "encrypt" in errors["locked.pdf"].lower()
    assert rep.docs_added == 6 and rep.chunks_embedded > 0
    assert stats.misses == 6  # six conversions, stored in the parse cache
    with connect_index(s) as c:
        meta = dict(c.execute("SELECT doc_id, metadata FROM manifest").fetchall())
        assert meta["manual.pdf"]["format"] == "pdf" and meta["manual.pdf"]["pages"] >= 1
        assert len(meta["manual.pdf"]["page_starts"]) == meta["manual.pdf"]["pages"]
        assert meta["deck.pptx"]["format"] == "pptx" and meta["json.html"]["format"] == "html"
        bodies = dict(c.execute("SELECT doc_id, body FROM document_bodies").fetchall())
        assert "json" in bodies["json.html"].lower() and "<script" not in bodies["json.html"]
        assert bodies["sheet.xlsx"].count("|") > 4  # tables kept as Markdown tables
        n_cache = c.execute("SELECT count(*) FROM rag_cache.parse_cache").fetchone()[0]

    # a touch (same bytes, new mtime) and a copy under a new name: read again, parsed never
    st = os.stat(s.source_path / "report.docx")
    os.utime(s.source_path / "report.docx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    shutil.copy(DATA / FILES["manual.pdf"], s.source_path / "manual-copy.pdf")
    rep, stats = _refresh(s)
    assert stats.misses == 0 and stats.hits == 2
    assert rep.docs_added == 1 and rep.chunks_embedded == 0  # the copy's texts are already embedded
    with connect_index(s) as c:
        assert c.execute("SELECT count(*) FROM rag_cache.parse_cache").fetchone()[0] == n_cache


def test_hits_of_a_pdf_name_their_pages(settings):
    """A chunk of a converted PDF cites the pages it spans (from the page starts and its char span)."""
    from rag_assets.embedders import make_embedder
    from rag_assets.query import search

    s = replace(settings, include=("**/*.pdf",), chunk_max_tokens=64)
    s.source_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "pdflatex-outline.pdf", s.source_path / "manual.pdf")
    _refresh(s)
    emb = make_embedder(s)
    try:
        with connect_index(s) as c:
            n_pages = c.execute("SELECT metadata->'pages' FROM manifest").fetchone()[0]
            starts = c.execute("SELECT metadata->'page_starts' FROM manifest").fetchone()[0]
            rows = c.execute("SELECT chunk_id, char_start, char_end FROM chunks ORDER BY seq").fetchall()
            hits = search(c, emb, "section", k=50, mode="keyword").results + search(c, emb, "section", k=50).results
    finally:
        emb.close()
    assert n_pages >= 2 and hits
    spans = {cid: (a, b) for cid, a, b in rows}
    for h in hits:
        assert "page_starts" not in h.metadata and h.pages
        a, b = spans[h.chunk_id]
        # every page named overlaps the chunk's span, and the pages are consecutive
        for p in h.pages:
            lo, hi = starts[p - 1], starts[p] if p < len(starts) else 10**12
            assert lo < b and a < hi
        assert h.pages == list(range(h.pages[0], h.pages[-1] + 1))
