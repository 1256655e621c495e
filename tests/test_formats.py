"""Binary formats to Markdown (rag_assets.formats) on real files other projects publish.

The files in tests/data/formats/ are copied unchanged from pypdf, python-pptx, python-docx and
tablib sdists and Debian's python3.11-doc (SOURCES.md names each one); hostile inputs (truncated
files, ZIP bombs, a broken container, script-only HTML) are made here from those or with zipfile.
"""

from __future__ import annotations

import dataclasses
import io
import platform
import re
import zipfile
from pathlib import Path

import pytest

from rag_assets.chunking import make_chunker
from rag_assets.formats import (
    CONVERTERS,
    ConversionWorker,
    FormatError,
    FormatLimits,
    PageSpan,
    ParseStats,
    content_sha256,
    convert,
    convert_cached,
    format_for,
    formats_code_version,
    pages_for_span,
)
from rag_assets.formats.conversion import PAGE_SEPARATOR
from rag_assets.settings import Settings, SettingsError
from rag_assets.sources import DocumentError
from rag_assets.store.db import connect

DATA = Path(__file__).parent / "data" / "formats"


def _read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def _conv(name: str, limits: FormatLimits | None = None):
    return convert(name, _read(name), format_for(name), limits)


def _assert_spans_valid(conv) -> None:
    """Spans are in order, disjoint, inside the text, separated by PAGE_SEPARATOR, and cover it."""
    assert conv.pages
    assert conv.pages[0].start == 0 and conv.pages[-1].end == len(conv.text)
    for a, b in zip(conv.pages, conv.pages[1:], strict=False):
        assert a.number < b.number
        assert conv.text[a.end : b.start] == PAGE_SEPARATOR
    for p in conv.pages:
        assert conv.text[p.start : p.end].strip() == conv.text[p.start : p.end] != ""


# ---------------------------------------------------------------- pure helpers


def test_pages_for_span_overlaps_separators_and_no_pages():
    pages = (PageSpan(1, 0, 10), PageSpan(2, 12, 20), PageSpan(4, 22, 30))
    assert pages_for_span(pages, 0, 5) == (1,)
    assert pages_for_span(pages, 5, 15) == (1, 2)
    assert pages_for_span(pages, 0, 30) == (1, 2, 4)
    assert pages_for_span(pages, 10, 12) == (1,)  # only the separator: the page before it
    assert pages_for_span(pages, 12, 13) == (2,)
    assert pages_for_span(pages, 25, 25) == (4,)  # empty span: the page it points into
    assert pages_for_span((), 0, 100) == ()


def test_format_for_by_suffix_then_media_type():
    assert format_for("reports/Q3.PDF") == "pdf"
    assert format_for("a/b.docx") == "docx" and format_for("s.pptx") == "pptx" and format_for("t.xlsx") == "xlsx"
    assert format_for("page.htm") == "html"
    assert format_for("object-without-suffix", "text/html; charset=utf-8") == "html"
    assert format_for("notes.md") is None and format_for("x.bin", "application/octet-stream") is None


def test_code_version_combines_every_converter_key(monkeypatch):
    before = formats_code_version()
    assert before == formats_code_version() and before.startswith("formats-")
    assert all(c.name in c.key and c.version in c.key and c.options in c.key for c in CONVERTERS.values())
    monkeypatch.setitem(CONVERTERS, "pdf", dataclasses.replace(CONVERTERS["pdf"], version="5.15.3+pdfium.9000"))
    assert formats_code_version() != before
    monkeypatch.setitem(CONVERTERS, "html", dataclasses.replace(CONVERTERS["html"], options="main=body"))
    assert formats_code_version() != before


def test_limits_come_from_settings():
    s = Settings.from_env({"RAG_FORMAT_MAX_CELLS": "10", "RAG_FORMAT_TIMEOUT_S": "5", "RAG_FORMAT_MAX_PAGES": "3"})
    limits = FormatLimits.from_settings(s)
    assert (limits.max_cells, limits.timeout_s, limits.max_pages) == (10, 5.0, 3)
    assert FormatLimits.from_settings(Settings.from_env({})) == FormatLimits()
    with pytest.raises(SettingsError, match="RAG_FORMAT_TIMEOUT_S=0"):
        Settings.from_env({"RAG_FORMAT_TIMEOUT_S": "0"})
    with pytest.raises(SettingsError, match="RAG_FORMAT_MAX_CELLS"):
        Settings.from_env({"RAG_FORMAT_MAX_CELLS": "lots"})


# ---------------------------------------------------------------- PDF


def test_pdf_text_layer_page_by_page_with_spans_for_chunks():
    conv = _conv("pdflatex-outline.pdf")
    assert conv.converter == "pdf-pypdfium2" and conv.converter_version.startswith("5.15.2")
    assert [p.number for p in conv.pages] == [1, 2, 3, 4]
    _assert_spans_valid(conv)
    page1 = conv.text[conv.pages[0].start : conv.pages[0].end]
    assert page1.startswith("Contents\n1 Foo 2")
    assert "Hello, here is some text without a meaning." in conv.text[conv.pages[1].start : conv.pages[1].end]
    # every chunk the structure chunker makes of the text can cite its pages
    chunks = make_chunker("structure", 64).chunk(conv.text)
    assert len(chunks) > 4
    cited = [pages_for_span(conv.pages, c.start, c.end) for c in chunks]
    assert all(cited) and cited[0][0] == 1 and cited[-1][-1] == 4
    assert any(len(p) == 2 for p in cited)  # a short page and the next one share a chunk: both are cited
    for c, pages in zip(chunks, cited, strict=True):
        for n in pages:
            span = next(p for p in conv.pages if p.number == n)
            assert c.start < span.end and c.end > span.start


def test_pdf_single_page_and_ocr_scan_with_text_layer():
    crazy = _conv("crazyones.pdf")
    assert crazy.text.startswith("The Crazy Ones\nOctober 14, 1998") and crazy.pages == (PageSpan(1, 0, len(crazy.text)),)
    ocr = _conv("Seige_of_Vicksburg_Sample_OCR.pdf")  # scanned pages that carry an OCR text layer: indexed
    assert len(ocr.pages) == 6 and "THE SIEGE OF VICKSBURG" in ocr.text
    _assert_spans_valid(ocr)
    assert "\x00" not in ocr.text and "\r" not in ocr.text


def test_pdf_without_text_layer_is_an_error_naming_the_doc():
    with pytest.raises(FormatError) as e:
        convert("scans/fax.pdf", _read("imagemagick-CCITTFaxDecode.pdf"), "pdf")
    assert e.value.kind == "no_text_layer" and isinstance(e.value, DocumentError)
    assert e.value.doc_id == "scans/fax.pdf" and "no text layer" in str(e.value) and str(e.value).startswith("scans/fax.pdf: ")


def test_encrypted_corrupt_and_oversized_pdfs():
    with pytest.raises(FormatError, match=r"^locked\.pdf: encrypted PDF") as e:
        convert("locked.pdf", _read("encrypted-file.pdf"), "pdf")
    assert e.value.kind == "encrypted"
    data = _read("crazyones.pdf")
    for cut in (len(data) // 2, 200):  # truncated downloads
        with pytest.raises(FormatError, match=r"^half\.pdf: not a readable PDF") as e:
            convert("half.pdf", data[:cut], "pdf")
        assert e.value.kind == "corrupt"
    with pytest.raises(FormatError) as e:
        convert("big.pdf", _read("pdflatex-outline.pdf"), "pdf", FormatLimits(max_pages=3))
    assert e.value.kind == "too_large" and "4 pages (limit 3" in str(e.value)


# ---------------------------------------------------------------- Office


def test_pptx_slide_by_slide_with_titles_tables_and_charts():
    conv = _conv("ph-populated-placeholders.pptx")
    assert conv.converter == "pptx-python-pptx"
    # slides 1-3 have no text (slide 3: an empty table): no span, and the numbers stay the slides'
    assert [p.number for p in conv.pages] == [4, 5, 6, 7]
    _assert_spans_valid(conv)
    slide5 = conv.text[conv.pages[1].start : conv.pages[1].end]
    assert slide5 == "## Slide 5: Title Text"
    assert "| 1st Qtr | 8.2 |" in conv.text[conv.pages[0].start : conv.pages[0].end]  # chart data as a table
    tables = _conv("tbl-cell.pptx")
    assert [p.number for p in tables.pages] == [1, 2, 3]
    assert "| having custom margins | vert anchor is inherited | vert anchor is top | vert anchor is bottom |" in tables.text
    chart = _conv("cht-charts.pptx").text
    assert "|  | Series 1 | Series 2 | Series 3 |" in chart and "| Category 4 | 4.5 | 2.8 | 5 |" in chart
    assert _conv("test.pptx").text.startswith("## Slide 1: Presentation Title Text")
    # the structure chunker cuts at slide headings; a title-only slide stays with the next heading
    chunks = make_chunker("structure", 512).chunk(conv.text)
    assert [pages_for_span(conv.pages, c.start, c.end) for c in chunks] == [(4,), (5, 6), (7,)]


def test_docx_headings_and_tables_without_pages():
    conv = _conv("par-known-styles.docx")
    assert conv.pages == () and conv.converter == "docx-mammoth"
    assert "\n# Heading 1\n" in conv.text and "Body Text" in conv.text
    tables = _conv("blk-paras-and-tables.docx").text
    assert "Lorem ipsum dolor sit amet" in tables and re.search(r"(?m)^\| --- \| --- \|$", tables)
    assert pages_for_span(conv.pages, 0, len(conv.text)) == ()


def test_xlsx_sheets_as_markdown_tables_and_a_wrong_dimension_is_ignored():
    conv = _conv("founders.xlsx")
    assert conv.text == (
        "## Sheet 1: Feuille1\n\n| first_name | last_name | gpa |\n|---|---|---|\n"
        "| John | Adams | 90 |\n| George | Washington | 67 |\n| Thomas | Jefferson | 50 |"
    )
    assert conv.pages == (PageSpan(1, 0, len(conv.text)),)
    bad = _conv("bad_dimensions.xlsx")  # declares 1024 columns x 1048576 rows for 4 rows of 3 cells
    assert bad.text.splitlines() == [
        "## Sheet 1: Sheet1", "", "| PN | Qty | Price |", "|---|---|---|",
        "| EP00001 | 10000 | 0.0367 |", "| EP00002 |  | 1 |", "| EP00004 | 10000 | 0.001 |",
    ]


def test_giant_spreadsheet_is_refused_by_cell_count():
    with pytest.raises(FormatError) as e:
        convert("finance/huge.xlsx", _read("founders.xlsx"), "xlsx", FormatLimits(max_cells=5))
    assert e.value.kind == "too_large" and str(e.value).startswith("finance/huge.xlsx: ")
    assert "more than 5 non-empty cells" in str(e.value) and "Feuille1" in str(e.value)


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_bomb_is_refused_from_the_central_directory():
    # 64 MiB of zeros deflate to ~64 KB: the ratio (~1000) is checked before anything inflates
    bomb = _zip({"[Content_Types].xml": b"<Types/>", "word/document.xml": bytes(64 * 1024 * 1024)})
    assert len(bomb) < 200_000
    with pytest.raises(FormatError) as e:
        convert("bomb.docx", bomb, "docx")
    assert e.value.kind == "too_large" and "decompression bomb" in str(e.value) and "bomb.docx" in str(e.value)
    # total uncompressed size: a real document over a (small) limit
    with pytest.raises(FormatError) as e:
        convert("styles.docx", _read("par-known-styles.docx"), "docx", FormatLimits(max_unzipped_bytes=10_000))
    assert e.value.kind == "too_large" and "limit 10000" in str(e.value)
    many = _zip({f"ppt/slides/s{i}.xml": b"" for i in range(50)} | {"ppt/presentation.xml": b""})
    with pytest.raises(FormatError, match="51 entries"):
        convert("many.pptx", many, "pptx", FormatLimits(max_zip_entries=50))


def test_broken_containers_and_mislabelled_files():
    pptx = _read("tbl-cell.pptx")
    with pytest.raises(FormatError, match=r"^deck\.pptx: not a valid PPTX \(broken ZIP container") as e:
        convert("deck.pptx", pptx[: len(pptx) // 2], "pptx")
    assert e.value.kind == "corrupt"
    with pytest.raises(FormatError, match="broken ZIP container"):
        convert("report.docx", _read("crazyones.pdf"), "docx")
    with pytest.raises(FormatError, match="no word/document.xml"):
        convert("deck-as.docx", pptx, "docx")  # a real ZIP, but a presentation
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(1024)
    with pytest.raises(FormatError, match="password-protected XLSX") as e:
        convert("locked.xlsx", ole, "xlsx")
    assert e.value.kind == "encrypted"
    # a container whose part is not XML: the parser's own error, reported as corrupt
    with pytest.raises(FormatError) as e:
        convert("junk.xlsx", _zip({"xl/workbook.xml": b"\x00not xml", "[Content_Types].xml": b"<"}), "xlsx")
    assert e.value.kind == "corrupt" and e.value.doc_id == "junk.xlsx"


# ---------------------------------------------------------------- HTML


def test_html_main_content_with_headings_and_code_without_chrome():
    raw = _read("python-3.11-library-json.html")
    assert raw.count(b"<script") >= 5 and b"Quick search" in raw
    conv = _conv("python-3.11-library-json.html")
    assert conv.pages == () and conv.converter == "html-bs4-markdownify"
    assert conv.text.startswith("# `json` — JSON encoder and decoder\n")
    assert re.search(r"(?m)^## Basic Usage$", conv.text)
    assert "```\n>>> import json\n>>> json.dumps(['foo'" in conv.text
    for chrome in ("Quick search", "Previous topic", "Navigation", "searchindex", "<script", "¶", "](http"):
        assert chrome not in conv.text, chrome


def test_html_full_of_scripts_is_an_error():
    page = _read("python-3.11-library-json.html").decode()
    head = page[: page.index("<body")]
    scripts = "".join(f"<script>var a{i} = {i};</script><style>p{{}}</style>" for i in range(2000))
    with pytest.raises(FormatError) as e:
        convert("spa/index.html", f"{head}<body>{scripts}<noscript>enable JS</noscript></body></html>".encode(), "html")
    assert e.value.kind == "no_text" and str(e.value).startswith("spa/index.html: HTML has no text")


def test_html_nested_beyond_reason_is_an_error_not_a_crash():
    nested = ("<div>" * 2000 + "deep" + "</div>" * 2000).encode()
    with pytest.raises(FormatError) as e:
        convert("deep.html", nested, "html")
    assert e.value.kind == "too_large" and "nested too deeply" in str(e.value)
    assert convert("ok.html", ("<div>" * 200 + "deep" + "</div>" * 200).encode(), "html").text == "deep"


def test_html_encoding_from_meta_and_article_main():
    html = '<html><head><meta charset="iso-8859-1"><title>T</title></head><body><nav>menu</nav>' \
           "<article><header><h2>Caf\xe9</h2></header><p>cr\xe8me</p></article><footer>c</footer></body></html>"
    conv = convert("latin.html", html.encode("latin-1"), "html")
    assert conv.text == "# T\n\n## Café\n\ncrème"


# ---------------------------------------------------------------- time limit (worker process)


def test_worker_times_out_then_recovers_with_a_new_process():
    data = _read("Seige_of_Vicksburg_Sample_OCR.pdf")
    with ConversionWorker(FormatLimits(timeout_s=0.001)) as slow:
        with pytest.raises(FormatError) as e:
            slow.convert("slow.pdf", data, "pdf")
        assert e.value.kind == "timeout" and "RAG_FORMAT_TIMEOUT_S" in str(e.value)
        slow.limits = FormatLimits(timeout_s=60)
        conv = slow.convert("fine.pdf", data, "pdf")  # a fresh child: the hung one was killed
        assert conv == convert("fine.pdf", data, "pdf") and slow.started == 2
        with pytest.raises(FormatError) as e:  # errors cross the process boundary unchanged
            slow.convert("locked.pdf", _read("encrypted-file.pdf"), "pdf")
        assert e.value.kind == "encrypted" and e.value.doc_id == "locked.pdf" and slow.started == 2


def test_worker_whose_process_dies_reports_crashed_naming_the_doc():
    # 1 MB of address space, less than the interpreter already maps: the child cannot even allocate
    # the 206 KB document it is sent and dies; the document gets an error, not a hung run
    data = _read("Seige_of_Vicksburg_Sample_OCR.pdf")
    with ConversionWorker(FormatLimits(memory_mb=1, timeout_s=60)) as tiny:
        with pytest.raises(FormatError) as e:
            tiny.convert("reports/q3.pdf", data, "pdf")
        assert e.value.kind == "crashed" and str(e.value).startswith("reports/q3.pdf: the converter process died")
        assert "exit code 1" in str(e.value)
        tiny.limits = FormatLimits()
        assert "THE SIEGE OF VICKSBURG" in tiny.convert("reports/q3.pdf", data, "pdf").text
        assert tiny.started == 2


# ---------------------------------------------------------------- portability (invariant 8)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="decodes x86-64 machine code")
def test_pdfium_uses_avx512_only_in_functions_chosen_at_run_time():
    """PDFium is the one native library this package adds with hand-vectorised code: its AVX-512
    must sit in Highway's per-target namespaces (N_AVX3*, N_AVX10*) or libyuv's *_AVX512* row
    functions, both selected by CPUID at run time, so it runs on CPUs without AVX-512."""
    import pypdfium2_raw

    from tests.binscan import scan_elf

    lib = Path(pypdfium2_raw.__file__).parent / "libpdfium.so"
    result = scan_elf(lib)
    assert result.instructions > 100_000
    undispatched = [f for f in result.avx512_by_function if not re.search(r"N_AVX(3|10)|_AVX512", f)]
    assert undispatched == []


# ---------------------------------------------------------------- parse cache (real Postgres)


def _cache_rows(conn) -> int:
    return conn.execute("SELECT count(*) FROM rag_cache.parse_cache").fetchone()[0]


def test_parse_cache_hits_same_bytes_once_and_reparses_on_converter_upgrade(db_url, monkeypatch):
    conn = connect(db_url)
    try:
        stats = ParseStats()
        pdf = _read("pdflatex-outline.pdf")
        first = convert_cached(conn, "a/outline.pdf", pdf, "pdf", stats=stats)
        again = convert_cached(conn, "a/outline.pdf", pdf, "pdf", stats=stats)
        other_id = convert_cached(conn, "b/copy-of-outline.pdf", pdf, "pdf", stats=stats)
        assert (stats.hits, stats.misses, stats.bytes_parsed) == (2, 1, len(pdf))
        assert first == again == other_id == convert("x", pdf, "pdf")  # text and page spans round-trip
        assert _cache_rows(conn) == 1
        row = conn.execute(
            "SELECT content_sha256, converter_key FROM rag_cache.parse_cache"
        ).fetchone()
        assert row == (content_sha256(pdf), CONVERTERS["pdf"].key)

        for name in ("founders.xlsx", "tbl-cell.pptx", "par-known-styles.docx", "python-3.11-library-json.html"):
            convert_cached(conn, name, _read(name), format_for(name), stats=stats)
            assert convert_cached(conn, name, _read(name), format_for(name), stats=stats) == _conv(name)
        assert (stats.hits, stats.misses) == (6, 5) and _cache_rows(conn) == 5

        # failures are not cached
        with pytest.raises(FormatError):
            convert_cached(conn, "scan.pdf", _read("imagemagick-CCITTFaxDecode.pdf"), "pdf", stats=stats)
        assert _cache_rows(conn) == 5 and stats.misses == 5

        # a converter upgrade (new version in the key) parses again; the old entry stays
        upgraded = dataclasses.replace(CONVERTERS["pdf"], version=CONVERTERS["pdf"].version + ".post1")
        monkeypatch.setitem(CONVERTERS, "pdf", upgraded)
        convert_cached(conn, "a/outline.pdf", pdf, "pdf", stats=stats)
        assert stats.misses == 6 and _cache_rows(conn) == 6
        convert_cached(conn, "a/outline.pdf", pdf, "pdf", stats=stats)
        assert stats.misses == 6 and stats.hits == 7

        # through the worker process, same cache
        with ConversionWorker() as worker:
            w = ParseStats()
            convert_cached(conn, "c.pdf", _read("crazyones.pdf"), "pdf", worker=worker, stats=w)
            convert_cached(conn, "d.pdf", _read("crazyones.pdf"), "pdf", worker=worker, stats=w)
            assert (w.hits, w.misses) == (1, 1) and worker.started == 1
    finally:
        conn.close()
