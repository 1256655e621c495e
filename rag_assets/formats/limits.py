"""Bounds on one conversion, so a hostile or giant file is an error naming it, never a hung run.

Limits change whether a conversion succeeds, never what it produces, so they are not part of the
converter key: raising a limit lets a refused file through without re-parsing the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from rag_assets.settings import Settings


@dataclass(frozen=True, slots=True)
class FormatLimits:
    max_pages: int = 5000  # PDF pages, PPTX slides, XLSX sheets
    max_cells: int = 1_000_000  # non-empty XLSX cells, all sheets together
    max_unzipped_bytes: int = 512 * 1024 * 1024  # sum of a ZIP container's uncompressed sizes (DOCX/PPTX/XLSX)
    max_zip_ratio: int = 200  # uncompressed/compressed, per ZIP entry over 1 MiB uncompressed
    max_zip_entries: int = 20_000
    timeout_s: float = 120.0  # per document, enforced by ConversionWorker
    memory_mb: int = 2048  # address-space limit of the ConversionWorker process

    @classmethod
    def from_settings(cls, settings: Settings) -> FormatLimits:
        return cls(
            max_pages=settings.format_max_pages,
            max_cells=settings.format_max_cells,
            max_unzipped_bytes=settings.format_max_unzipped_bytes,
            max_zip_ratio=settings.format_max_zip_ratio,
            timeout_s=settings.format_timeout_s,
            memory_mb=settings.format_memory_mb,
        )
