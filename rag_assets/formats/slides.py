"""PPTX: python-pptx, one ``## Slide N: title`` section per slide, with its page span.

Within a slide: text frames in shape order (bulleted by outline level), tables as Markdown
tables, charts as their title and a table of their data, group shapes recursively, pictures by
their alt text, then the speaker notes under
``### Notes``. Hidden slides are converted too (they are part of the document's content).
"""

from __future__ import annotations

import io
from importlib.metadata import version

from rag_assets.formats.conversion import Conversion, join_pages
from rag_assets.formats.errors import NO_TEXT, TOO_LARGE, FormatError
from rag_assets.formats.limits import FormatLimits
from rag_assets.formats.tables import table
from rag_assets.formats.zipguard import check_zip

NAME = "pptx-python-pptx"
GLUE_VERSION = "1"
VERSION = f"python-pptx.{version('python-pptx')}+glue.{GLUE_VERSION}"
OPTIONS = "sections=slide,notes=yes"


def convert_pptx(doc_id: str, data: bytes, limits: FormatLimits) -> Conversion:
    check_zip(doc_id, data, limits, "ppt/presentation.xml", "PPTX")
    from pptx import Presentation  # imported on first use: importing rag_assets.formats stays cheap

    prs = Presentation(io.BytesIO(data))
    slides = list(prs.slides)
    if len(slides) > limits.max_pages:
        raise FormatError(doc_id, TOO_LARGE, f"PPTX has {len(slides)} slides (limit {limits.max_pages}: RAG_FORMAT_MAX_PAGES)")
    parts = []
    for number, slide in enumerate(slides, 1):
        title_shape = slide.shapes.title
        title = " ".join(title_shape.text_frame.text.split()) if title_shape is not None and title_shape.has_text_frame else ""
        body: list[str] = []
        for shape in slide.shapes:
            if title_shape is not None and shape.shape_id == title_shape.shape_id:
                continue
            body.extend(_shape_blocks(shape))
        if slide.has_notes_slide:
            notes = slide.notes_slide.notes_text_frame
            if notes is not None and notes.text.strip():
                body.append("### Notes\n\n" + notes.text.strip())
        body = [b for b in body if b]
        if not title and not body:
            continue
        heading = f"## Slide {number}: {title}" if title else f"## Slide {number}"
        parts.append((number, "\n\n".join([heading, *body])))
    text, pages = join_pages(parts)
    if not text:
        raise FormatError(doc_id, NO_TEXT, f"PPTX has no text on its {len(slides)} slides")
    return Conversion(text, pages, NAME, VERSION)


def _shape_blocks(shape) -> list[str]:
    from pptx.enum.shapes import MSO_SHAPE_TYPE

    if shape.shape_type == MSO_SHAPE_TYPE.GROUP:
        return [b for s in shape.shapes for b in _shape_blocks(s)]
    if getattr(shape, "has_table", False) and shape.has_table:
        rows = [[cell.text for cell in row.cells] for row in shape.table.rows]
        return [table(rows)] if rows else []
    if getattr(shape, "has_text_frame", False) and shape.has_text_frame:
        lines = []
        for para in shape.text_frame.paragraphs:
            text = " ".join(para.text.split())
            if text:
                lines.append(("  " * para.level + "- " + text) if para.level else text)
        return ["\n".join(lines)] if lines else []
    if getattr(shape, "has_chart", False) and shape.has_chart:
        return _chart_blocks(shape.chart)
    if shape.shape_type == MSO_SHAPE_TYPE.PICTURE:
        alt = shape._element.xpath("./p:nvPicPr/p:cNvPr/@descr")
        return [alt[0].strip()] if alt and alt[0].strip() else []
    return []


def _chart_blocks(chart) -> list[str]:
    """A chart as its title and data: one table per plot, categories down, series across."""
    title = ""
    if chart.has_title and chart.chart_title.has_text_frame:
        title = " ".join(chart.chart_title.text_frame.text.split())
    blocks = [f"Chart: {title}" if title else "Chart"]
    try:
        plots = list(chart.plots)
    except NotImplementedError:  # a chart type python-pptx cannot read: its title still counts
        plots = []
    for plot in plots:
        try:
            series = list(plot.series)
        except NotImplementedError:
            continue
        if not series:
            continue
        try:
            categories = [str(c) for c in plot.categories]
        except (AttributeError, KeyError, ValueError):  # XY and bubble plots have no categories
            categories = []
        try:
            columns = [list(s.values) for s in series]
        except (NotImplementedError, KeyError, ValueError):
            continue
        n = max(len(categories), *(len(c) for c in columns))
        rows = [["", *(s.name or "" for s in series)]]
        for i in range(n):
            label = categories[i] if i < len(categories) else str(i + 1)
            rows.append([label, *(c[i] if i < len(c) else None for c in columns)])
        blocks.append(table(rows))
    return blocks
