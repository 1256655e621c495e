"""XLSX: openpyxl in read-only mode, one ``## Sheet N: name`` section per sheet, as a Markdown table.

Read-only mode streams the sheet XML, so memory stays bounded; the stored cell values are used
(``data_only``: the value Excel last computed, not the formula). The sheet's declared dimension
is ignored (it can be wrong or hostile: A1:XFD1048576 would pad every row to 16k columns); rows
and columns that are empty everywhere are dropped, and non-empty cells are counted against
``max_cells`` as they stream. The first non-empty row is the table header.
"""

from __future__ import annotations

import io
import warnings
from importlib.metadata import version

from rag_assets.formats.conversion import Conversion, join_pages
from rag_assets.formats.errors import NO_TEXT, TOO_LARGE, FormatError
from rag_assets.formats.limits import FormatLimits
from rag_assets.formats.tables import table
from rag_assets.formats.zipguard import check_zip

NAME = "xlsx-openpyxl"
GLUE_VERSION = "1"
VERSION = f"openpyxl.{version('openpyxl')}+glue.{GLUE_VERSION}"
OPTIONS = "values=cached,header=first-row,sections=sheet"


def convert_xlsx(doc_id: str, data: bytes, limits: FormatLimits) -> Conversion:
    check_zip(doc_id, data, limits, "xl/workbook.xml", "XLSX")
    import openpyxl  # imported on first use: importing rag_assets.formats stays cheap for the CLI

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # openpyxl warns about styles/extensions it does not read
        wb = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        sheets = wb.worksheets
        if len(sheets) > limits.max_pages:
            raise FormatError(doc_id, TOO_LARGE, f"XLSX has {len(sheets)} sheets (limit {limits.max_pages}: RAG_FORMAT_MAX_PAGES)")
        cells = 0
        parts = []
        for number, ws in enumerate(sheets, 1):
            if hasattr(ws, "reset_dimensions"):
                ws.reset_dimensions()
            rows: list[list[object]] = []
            for raw in ws.iter_rows(values_only=True):
                row = list(raw)
                while row and _empty(row[-1]):
                    row.pop()
                if not row:
                    continue
                cells += sum(1 for v in row if not _empty(v))
                if cells > limits.max_cells:
                    raise FormatError(
                        doc_id,
                        TOO_LARGE,
                        f"XLSX has more than {limits.max_cells} non-empty cells (limit RAG_FORMAT_MAX_CELLS; "
                        f"reached in sheet {ws.title!r})",
                    )
                rows.append(row)
            if not rows:
                continue
            width = max(len(r) for r in rows)
            keep = [c for c in range(width) if any(c < len(r) and not _empty(r[c]) for r in rows)]
            body = table([[r[c] if c < len(r) else None for c in keep] for r in rows])
            parts.append((number, f"## Sheet {number}: {ws.title}\n\n{body}"))
    finally:
        wb.close()
    text, pages = join_pages(parts)
    if not text:
        raise FormatError(doc_id, NO_TEXT, f"XLSX has no values in its {len(sheets)} sheets")
    return Conversion(text, pages, NAME, VERSION)


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
