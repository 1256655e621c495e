"""The source an index is bound to, built from its recorded root: a folder or an ``s3://`` URI."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rag_assets.sources.base import Source


def is_s3_uri(root: str | Path) -> bool:
    return isinstance(root, str) and root.startswith("s3://")


def canonical_root(root: str | Path) -> str:
    """How a source root is recorded: a resolved absolute folder, or ``s3://bucket/prefix/``."""
    if is_s3_uri(root):
        from rag_assets.settings import SettingsError
        from rag_assets.sources.s3 import S3Location

        try:
            return S3Location.parse(str(root)).uri
        except ValueError as e:
            raise SettingsError(str(e)) from None
    return str(Path(root).resolve())


def open_source(root: str, include: Iterable[str], exclude: Iterable[str], settings) -> Source:
    """A folder source or an S3 source for ``root``, with the limits of ``settings``."""
    if is_s3_uri(root):
        from rag_assets.sources.s3 import S3Source

        return S3Source(
            root,
            include,
            exclude,
            settings.max_doc_bytes,
            settings.max_metadata_bytes,
            get_concurrency=settings.s3_get_concurrency,
            max_attempts=settings.s3_max_attempts,
        )
    from rag_assets.sources.folder import FolderSource

    return FolderSource(root, include, exclude, settings.max_doc_bytes, max_metadata_bytes=settings.max_metadata_bytes)
