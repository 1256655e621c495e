"""HTML -> Markdown (markdownify), shared by the DOCX and HTML converters; imported when first used."""

from __future__ import annotations

from bs4 import BeautifulSoup
from markdownify import MarkdownConverter


class _Converter(MarkdownConverter):
    """markdownify with ATX headings (what the chunker reads), links and images reduced to their text.

    Link targets and escapes (``\\_``) are tokens an embedding pays for and a reader of a chunk
    does not need; the text of the link is what is searched for.
    """

    def convert_a(self, el, text, parent_tags):
        return text

    def convert_img(self, el, text, parent_tags):
        return el.get("alt") or ""


def html_to_markdown(soup: BeautifulSoup) -> str:
    """Markdown of a (cleaned) element tree: ``#`` headings, ``-`` bullets, fenced code, GFM tables."""
    return _Converter(
        heading_style="ATX", bullets="-", code_language="", escape_misc=False, escape_underscores=False, escape_asterisks=False
    ).convert_soup(soup)
