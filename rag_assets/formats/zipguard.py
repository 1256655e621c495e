"""Check an Office Open XML container (DOCX, PPTX, XLSX) before any converter opens it.

A decompression bomb is a small ZIP whose entries inflate to gigabytes. The central directory
states every entry's compressed and uncompressed size, so the totals and ratios are checked from
it alone, without inflating anything. The declared sizes can be trusted as upper bounds because
every converter here reads through CPython's ``zipfile``, which stops an entry at its declared
``file_size`` (a lying entry then fails its CRC check: ``BadZipFile``, reported as corrupt).
"""

from __future__ import annotations

import io
import zipfile

from rag_assets.formats.errors import CORRUPT, ENCRYPTED, TOO_LARGE, FormatError
from rag_assets.formats.limits import FormatLimits

OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # compound file: encrypted OOXML, or legacy .doc/.xls/.ppt
RATIO_FLOOR = 1024 * 1024  # entries smaller than this are never a bomb, whatever their ratio


def check_zip(doc_id: str, data: bytes, limits: FormatLimits, required: str, what: str) -> None:
    """Raise :class:`FormatError` unless ``data`` is a sane ZIP holding the part ``required``."""
    if data.startswith(OLE_MAGIC):
        raise FormatError(
            doc_id,
            ENCRYPTED,
            f"not a {what} ZIP container but an OLE compound file: a password-protected {what} "
            "(or a legacy binary Office file)",
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise FormatError(doc_id, CORRUPT, f"not a valid {what} (broken ZIP container: {e})") from None
    if len(infos) > limits.max_zip_entries:
        raise FormatError(
            doc_id, TOO_LARGE, f"{what} ZIP container has {len(infos)} entries (limit {limits.max_zip_entries})"
        )
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > RATIO_FLOOR and info.file_size > limits.max_zip_ratio * max(info.compress_size, 1):
            raise FormatError(
                doc_id,
                TOO_LARGE,
                f"{what} ZIP entry {info.filename!r} inflates {info.compress_size} to {info.file_size} bytes "
                f"(ratio over {limits.max_zip_ratio}: a decompression bomb?)",
            )
        if info.flag_bits & 0x1:
            raise FormatError(doc_id, ENCRYPTED, f"{what} ZIP entry {info.filename!r} is encrypted")
    if total > limits.max_unzipped_bytes:
        raise FormatError(
            doc_id,
            TOO_LARGE,
            f"{what} ZIP container inflates to {total} bytes (limit {limits.max_unzipped_bytes}: RAG_FORMAT_MAX_UNZIPPED_BYTES)",
        )
    if required not in {i.filename for i in infos}:
        raise FormatError(doc_id, CORRUPT, f"not a {what}: the ZIP container has no {required}")
