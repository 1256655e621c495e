"""PDF: the text layer, page by page, through pypdfium2 (PDFium, Chrome's PDF engine).

Chosen by measurement (docs/architecture.md, "Decision: document converters"): on 40 TeX Live
manuals (708 pages) it read 287 pages/s against pypdf's 21 and markitdown/pdfminer's 7, and its
words agreed best with the other two. No layout analysis and no OCR: a page is its text in
PDFium's reading order; a PDF without a text layer is refused (NO_TEXT_LAYER), never indexed empty.
"""

from __future__ import annotations

import threading

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from pypdfium2.version import PDFIUM_INFO, PYPDFIUM_INFO

from rag_assets.formats.conversion import Conversion, clean_text, join_pages
from rag_assets.formats.errors import CORRUPT, ENCRYPTED, NO_TEXT_LAYER, TOO_LARGE, FormatError
from rag_assets.formats.limits import FormatLimits

NAME = "pdf-pypdfium2"
GLUE_VERSION = "1"  # bump when this module's output for the same library version changes
VERSION = f"{PYPDFIUM_INFO}+pdfium.{PDFIUM_INFO.build}+glue.{GLUE_VERSION}"
OPTIONS = "text=bounded,pages=join-blank-line"
MIN_CHARS_PER_PAGE = 8  # less than this on average, with images on the pages: a scan (page numbers only)
_PDFIUM = threading.Lock()  # PDFium is not thread-safe: one document at a time per process


def convert_pdf(doc_id: str, data: bytes, limits: FormatLimits) -> Conversion:
    """The text layer of every page; sources calling from several threads are serialised here."""
    with _PDFIUM:
        return _convert(doc_id, data, limits)


def _convert(doc_id: str, data: bytes, limits: FormatLimits) -> Conversion:
    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        if "password" in str(e).lower():
            raise FormatError(doc_id, ENCRYPTED, "encrypted PDF: a password is needed to open it") from None
        raise FormatError(doc_id, CORRUPT, f"not a readable PDF ({e})") from None
    try:
        n = len(doc)
        if n > limits.max_pages:
            raise FormatError(doc_id, TOO_LARGE, f"PDF has {n} pages (limit {limits.max_pages}: RAG_FORMAT_MAX_PAGES)")
        parts: list[tuple[int, str]] = []
        for i in range(n):
            page = doc[i]
            try:
                textpage = page.get_textpage()
                try:
                    parts.append((i + 1, textpage.get_text_bounded()))
                finally:
                    textpage.close()
            finally:
                page.close()
        chars = sum(len("".join(t.split())) for _, t in parts)
        if chars == 0:
            raise FormatError(doc_id, NO_TEXT_LAYER, f"PDF has no text layer ({n} pages without text: a scan needs OCR)")
        if chars < MIN_CHARS_PER_PAGE * n and _has_images(doc, n):
            raise FormatError(
                doc_id,
                NO_TEXT_LAYER,
                f"PDF has no text layer (only {chars} characters on {n} pages of images: a scan needs OCR)",
            )
    except pdfium.PdfiumError as e:
        raise FormatError(doc_id, CORRUPT, f"PDF page could not be read ({e})") from None
    finally:
        doc.close()
    text, pages = join_pages((number, _dehyphenate(t)) for number, t in parts)
    return Conversion(text, pages, NAME, VERSION)


def _has_images(doc: pdfium.PdfDocument, n: int) -> bool:
    for i in range(n):
        page = doc[i]
        try:
            if any(True for _ in page.get_objects(filter=(pdfium_c.FPDF_PAGEOBJ_IMAGE,), max_depth=2)):
                return True
        finally:
            page.close()
    return False


def _dehyphenate(text: str) -> str:
    """PDFium marks a hyphen it found at a line end as U+0002: join the word, as a reader would."""
    return clean_text(text.replace("\x02\r\n", "").replace("\x02\n", "").replace("\x02", "-"))
