"""DOCX: mammoth (the library markitdown uses) maps Word styles to HTML, markdownify to Markdown.

Heading styles become ``#`` headings, lists and tables are kept, images are dropped (mammoth
would inline them as base64). Word documents have no fixed pages (pagination is the renderer's),
so the conversion has no page spans.
"""

from __future__ import annotations

import io
from importlib.metadata import version

from rag_assets.formats.conversion import Conversion, clean_text
from rag_assets.formats.errors import NO_TEXT, FormatError
from rag_assets.formats.limits import FormatLimits
from rag_assets.formats.zipguard import check_zip

NAME = "docx-mammoth"
GLUE_VERSION = "1"
VERSION = f"mammoth.{version('mammoth')}+markdownify.{version('markdownify')}+glue.{GLUE_VERSION}"
OPTIONS = "images=drop,headings=atx"


def _no_image(image) -> dict:
    return {"alt": image.alt_text or ""}


def convert_docx(doc_id: str, data: bytes, limits: FormatLimits) -> Conversion:
    check_zip(doc_id, data, limits, "word/document.xml", "DOCX")
    import mammoth  # imported on first use: importing rag_assets.formats stays cheap for the CLI
    from bs4 import BeautifulSoup

    from rag_assets.formats.markdown import html_to_markdown

    result = mammoth.convert_to_html(io.BytesIO(data), convert_image=mammoth.images.img_element(_no_image))
    soup = BeautifulSoup(result.value, "lxml")
    text = clean_text(html_to_markdown(soup))
    if not text:
        raise FormatError(doc_id, NO_TEXT, "DOCX has no text")
    return Conversion(text, (), NAME, VERSION)
