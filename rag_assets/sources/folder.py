"""The folder source: documents are files under a root, found by one ``stat`` each.

doc_id is the POSIX path relative to the folder root, so ids are stable across machines.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from rag_assets.sources.base import (
    BOUND_SOURCE_TAG,
    Document,
    DocumentChanging,
    DocumentError,
    DocumentGone,
    FileStat,
    RawDocument,
    ScanResult,
)
from rag_assets.sources.documents import document_from_raw, validate_doc_id
from rag_assets.sources.globs import GlobMatcher
from rag_assets.sources.metadata import DEFAULT_MAX_METADATA_BYTES


class FolderSource:
    """Documents are the files under ``root`` matching ``include`` and not ``exclude``."""

    name = BOUND_SOURCE_TAG
    kind = "folder"
    token_metadata_keys: tuple[str, ...] = ()  # (size, mtime_ns) is the whole change token

    converter = None  # a sources.convert.DocumentConverter, set by the stage that reads (it holds a connection)

    def __init__(
        self,
        root: Path | str,
        include: Iterable[str] = ("**/*",),
        exclude: Iterable[str] = (),
        max_doc_bytes: int = 10 * 1024 * 1024,
        max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
    ):
        self.root = Path(root)
        self.max_metadata_bytes = max_metadata_bytes
        self.include = GlobMatcher(include)
        exclude = list(exclude)
        self.exclude = GlobMatcher(exclude) if exclude else None
        self.max_doc_bytes = max_doc_bytes

    def describe(self) -> str:
        return str(self.root)

    def scan(self) -> ScanResult:
        """Stat every matching file once. Symlinks are not followed (they could leave the root).

        Folders are recognised from the directory entry's type (no syscall) and names are matched
        before the ``stat``, so a no-change refresh costs one ``stat`` per indexed file.
        """
        if not self.root.is_dir():
            raise FileNotFoundError(f"source folder does not exist or is not a directory: {self.root}")
        stats: dict[str, FileStat] = {}
        errors: list[tuple[str, str]] = []
        pending = [("", str(self.root))]
        while pending:
            subdirs, st, errs = self._scan_dir(*pending.pop())
            stats.update(st)
            errors.extend(errs)
            pending.extend(subdirs)
        return ScanResult(stats, errors)

    def _scan_dir(
        self, rel_dir: str, abs_dir: str
    ) -> tuple[list[tuple[str, str]], dict[str, FileStat], list[tuple[str, str]]]:
        """One folder: (subfolders, matching files' stats, errors)."""
        subdirs: list[tuple[str, str]] = []
        stats: dict[str, FileStat] = {}
        errors: list[tuple[str, str]] = []
        try:
            it = os.scandir(abs_dir)
        except OSError as e:
            return subdirs, stats, [(rel_dir or ".", f"cannot list folder: {e.strerror}")]
        with it:
            for entry in it:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):  # d_type: no syscall
                        subdirs.append((rel, entry.path))
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if not self.include.match(rel, entry.name):
                        continue
                    if self.exclude is not None and self.exclude.match(rel, entry.name):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we scan: simply not there
                except OSError as e:
                    errors.append((rel, f"cannot stat: {e.strerror}"))
                    continue
                try:
                    validate_doc_id(rel)
                except DocumentError as e:
                    errors.append((e.doc_id, e.reason))
                    continue
                stats[rel] = FileStat(st.st_size, st.st_mtime_ns)
        return subdirs, stats, errors

    def read_bytes(self, doc_id: str, expected: FileStat | None = None) -> RawDocument:
        """One file's bytes, exactly as its stat says. ``DocumentGone`` if it vanished since the scan.

        No symbolic link is followed in any component (``safe_open.read_under``). ``expected`` is
        the stat the scan saw: a file whose size or mtime moved since then, or during the read, is
        being written; reading it now would index half a file, so it raises
        :class:`DocumentChanging` (the last good version stays; the next run reads it).
        """
        from rag_assets.safe_open import NotRegular, UnsafePath, read_under

        try:
            r = read_under(self.root, doc_id, self.max_doc_bytes)
        except (FileNotFoundError, NotRegular):
            raise DocumentGone(doc_id) from None
        except UnsafePath as e:
            raise DocumentError(doc_id, f"not read: {e} (links are never followed)") from None
        except PermissionError as e:
            raise DocumentError(doc_id, f"cannot read: {e.strerror}") from None
        except OSError as e:
            raise DocumentError(doc_id, f"cannot read: {e.strerror or e}") from None
        if r.size > self.max_doc_bytes:
            raise DocumentError(
                doc_id, f"document too large ({r.size} bytes > RAG_MAX_DOC_BYTES={self.max_doc_bytes})"
            )
        moved = (r.size, r.mtime_ns) != (r.size_after, r.mtime_ns_after) or len(r.data) != r.size
        if expected is not None and (expected.size, expected.mtime_ns) != (r.size, r.mtime_ns):
            moved = True
        if moved:
            raise DocumentChanging(
                doc_id, f"being written during the scan or read ({r.size} → {r.size_after} bytes); read on the next run"
            )
        content_type = mimetypes.guess_type(doc_id, strict=False)[0]
        return RawDocument(doc_id, r.data, content_type, FileStat(r.size, r.mtime_ns))

    def read(self, doc_id: str, expected: FileStat | None = None) -> Document:
        """Read and normalise one document (see :meth:`read_bytes`). A folder adds no metadata keys of
        its own beyond path, size and mtime."""
        raw = self.read_bytes(doc_id, expected)
        if self.converter is not None:  # PDF, Office, HTML: Markdown through the parse cache
            raw = self.converter.to_text(raw)
        return document_from_raw(raw, self.max_doc_bytes, self.max_metadata_bytes)

    def token_of(self, *values: str | None) -> None:
        return None

    def read_many(
        self, items: Iterable[tuple[str, FileStat | None]]
    ) -> Iterator[tuple[str, Document | DocumentError | DocumentGone]]:
        """Read documents one by one, in order (a local read gains nothing from threads here)."""
        for doc_id, expected in items:
            try:
                yield doc_id, self.read(doc_id, expected)
            except (DocumentError, DocumentGone) as e:
                yield doc_id, e
