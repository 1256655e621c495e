"""The source interface: what every document source answers, and the typed values it answers with.

A source answers two questions cheaply and one expensively:

* ``scan()`` — which documents exist, each with a cheap *change token* (:class:`FileStat`): a
  folder's ``(size, mtime_ns)`` from one ``stat``, an object store's size, LastModified and
  ``ETag``/``VersionId`` from one listing. Like git's index, a document whose token is unchanged is
  not read again.
* ``read_bytes(doc_id)`` — the raw bytes, their content type and the metadata the source itself
  knows (object URI, ETag...), as a :class:`RawDocument`: what a converter (PDF, Office, HTML)
  will take.
* ``read(doc_id)`` — the normalised text and metadata of one document (:class:`Document`), or a
  ``DocumentError`` that names it. Bad input never stops a run.

The manifest stage, the checks and the sensors depend on this interface only. Documents pushed by
webhooks are not scanned (they arrive as events) but go through the same normalisation
(``sources/webhook.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# The manifest's ``source`` value for documents of the index's bound source, folder or bucket
# alike (webhook documents are "webhook"). One tag for every bound source, so pointing an index
# from a folder at a bucket (``--change-source``) replaces the folder's documents like any other
# change of source, and existing manifests, snapshots and the webhook ownership rule stay valid.
BOUND_SOURCE_TAG = "folder"


class DocumentError(Exception):
    """One document could not be used. ``str()`` names the document and the reason."""

    def __init__(self, doc_id: str, reason: str):
        super().__init__(f"{doc_id}: {reason}")
        self.doc_id = doc_id
        self.reason = reason


class DocumentChanging(DocumentError):
    """The document changed between the scan and the read, or during it: a writer is busy with it."""


class DocumentGone(Exception):
    """The document disappeared between the scan and the read (treated as deleted, not an error)."""


class SourceError(RuntimeError):
    """The source as a whole cannot be read (a missing bucket, access denied): nothing is changed.

    ``kind = "source"`` makes the CLI exit with the source's code (``failures.EXIT_SOURCE``).
    """

    kind = "source"


@dataclass(frozen=True, slots=True)
class FileStat:
    """A document's cheap change token, as the scan sees it.

    ``token`` is what ``(size, mtime_ns)`` cannot show: an object's ETag and version id (None for
    folders). Equal stats mean "not changed" to the fast path.
    """

    size: int
    mtime_ns: int
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Document:
    """A normalised document: ``text`` is the body (front matter removed), ready to chunk."""

    doc_id: str
    text: str
    metadata: dict
    size: int
    mtime_ns: int
    content_hash: str
    meta_hash: str


@dataclass(frozen=True, slots=True)
class RawDocument:
    """One document's bytes as the source holds them, before any decoding or conversion.

    ``source_metadata`` holds the keys the source itself vouches for (an object's ``uri``, ``etag``,
    ``version_id``, ``content_type``, ``user_metadata``); they win over front matter keys of the
    same name. ``stat`` is the change token of exactly these bytes.
    """

    doc_id: str
    data: bytes
    content_type: str | None
    stat: FileStat
    source_metadata: dict = field(default_factory=dict)


@dataclass
class ScanResult:
    stats: dict[str, FileStat]
    errors: list[tuple[str, str]]  # (doc_id or path, reason) for entries that cannot be documents


@runtime_checkable
class Source(Protocol):
    """A listable document source (folder, bucket). See the module docstring."""

    name: str  # the manifest's source tag (BOUND_SOURCE_TAG)
    kind: str  # "folder" or "s3": for messages and metadata
    # metadata keys holding the change token beyond (size, mtime_ns); () when there is none
    token_metadata_keys: tuple[str, ...]

    def describe(self) -> str:
        """Where the documents come from, for messages: a folder path or an ``s3://`` URI."""
        ...

    def scan(self) -> ScanResult: ...

    def read_bytes(self, doc_id: str, expected: FileStat | None = None) -> RawDocument: ...

    def read(self, doc_id: str, expected: FileStat | None = None) -> Document: ...

    def read_many(
        self, items: Iterable[tuple[str, FileStat | None]]
    ) -> Iterator[tuple[str, Document | DocumentError | DocumentGone]]:
        """Each document or its per-document exception, in the order given (bounded parallelism
        where the source gains from it)."""
        ...

    def token_of(self, *values: str | None) -> str | None:
        """The change token from the stored values of ``token_metadata_keys``."""
        ...
