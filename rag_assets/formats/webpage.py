"""HTML: the page's main content as Markdown (BeautifulSoup + lxml, then markdownify).

Scripts, styles, templates, embedded objects, forms and page chrome (nav, aside, header and footer
unless inside an article or section,
ARIA navigation/banner/contentinfo/search regions, Sphinx's "¶" header links) are removed; the
main content is ``<main>``, else ``[role=main]``, else a single ``<article>``, else ``<body>``.
Headings stay ``#`` headings; when the content has no ``<h1>``, the page ``<title>`` becomes one.
The encoding is detected from the bytes (BOM, ``<meta charset>``, then statistics). Markup
nested deeper than about 330 elements is refused (TOO_LARGE: markdownify recurses per element;
real pages stay far below), never a crash of the run.
"""

from __future__ import annotations

from importlib.metadata import version

from rag_assets.formats.conversion import Conversion, clean_text
from rag_assets.formats.errors import NO_TEXT, FormatError
from rag_assets.formats.limits import FormatLimits

NAME = "html-bs4-markdownify"
GLUE_VERSION = "1"
VERSION = (
    f"beautifulsoup4.{version('beautifulsoup4')}+lxml.{version('lxml')}+markdownify.{version('markdownify')}"
    f"+glue.{GLUE_VERSION}"
)
OPTIONS = "main=main|role-main|article|body,chrome=drop,title=h1-if-missing"

DROP_TAGS = (
    "script", "style", "noscript", "template", "iframe", "object", "embed", "svg", "canvas", "form",
    "button", "input", "select", "textarea", "nav", "aside", "link", "meta",
)
PAGE_CHROME = ("header", "footer")  # dropped unless they belong to an article/section (its title, byline)
DROP_ROLES = ("navigation", "banner", "contentinfo", "search", "complementary")


def convert_html(doc_id: str, data: bytes, limits: FormatLimits) -> Conversion:
    from bs4 import BeautifulSoup  # imported on first use: importing rag_assets.formats stays cheap

    from rag_assets.formats.markdown import html_to_markdown

    soup = BeautifulSoup(data, "lxml")
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text().split()) if title_tag else ""
    main = soup.find("main") or soup.find(attrs={"role": "main"})
    if main is None:
        articles = soup.find_all("article")
        main = articles[0] if len(articles) == 1 else (soup.body or soup)
    for tag in main.find_all(DROP_TAGS):
        tag.decompose()
    for tag in main.find_all(PAGE_CHROME):
        if tag.find_parent(("article", "section", "main")) is None:
            tag.decompose()
    for tag in main.find_all(attrs={"role": DROP_ROLES}):
        tag.decompose()
    for tag in main.find_all(attrs={"hidden": True}):
        tag.decompose()
    for tag in main.find_all("a", class_="headerlink"):
        tag.decompose()
    text = clean_text(html_to_markdown(main))
    if not text:
        raise FormatError(doc_id, NO_TEXT, "HTML has no text once scripts, styles and page chrome are removed")
    if title and main.find("h1") is None:
        text = f"# {title}\n\n{text}"
    return Conversion(text, (), NAME, VERSION)
