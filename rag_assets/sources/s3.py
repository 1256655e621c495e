"""The object-store source: documents are the objects under ``s3://bucket/prefix``.

Change detection is as cheap as the folder's ``stat``: one paginated listing (1,000 keys per
request) gives every key's size, LastModified and ETag, and an entry equal to the manifest's costs
nothing more. A changed entry costs one GET; if its content hash is unchanged (a touch, a copy
onto itself, re-encryption) the manifest stage finds only its metadata (ETag, version id, mtime)
changed: no re-chunking, no embedding. Deletes are the keyspace diff: a key absent from the listing
is deleted, whatever its age (never a time window).

Versioned buckets are listed with ``ListObjectVersions`` (the latest version of each key; a key
whose latest version is a delete marker is deleted). Why: S3's LastModified has one-second
resolution and a copy onto itself (new user metadata) or a re-upload of the same bytes keeps the
ETag, so within one second only the VersionId shows the change; the version id is part of the
metadata, so the index would otherwise keep a stale one. The price: the listing also pages through
noncurrent versions (keep them bounded with a lifecycle rule). Unversioned buckets (or a role
without ``s3:GetBucketVersioning``) use ``ListObjectsV2``: there, a same-bytes rewrite or metadata
copy within the same second as the previous write is seen at the next change of the object.

Configuration is boto3's standard chain: credentials (environment, profile, SSO, instance role),
region, and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for MinIO, R2 and other S3-compatible
stores. Retries are botocore's ``standard`` mode. A missing bucket, denied access or an unreachable
endpoint is one :class:`SourceError` naming the bucket; an object over ``RAG_MAX_DOC_BYTES``
(known from the listing: no GET) or of a type this source cannot read is reported by key and skipped.

doc_id = the key relative to the prefix (``s3://b/docs/`` and key ``docs/a/x.md`` give ``a/x.md``);
metadata adds ``uri``, ``etag``, ``version_id``, ``content_type`` and ``user_metadata`` (the
``x-amz-meta-*`` headers of the GET, no extra HEAD); ``mtime`` is the object's LastModified.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from rag_assets.sources.base import (
    BOUND_SOURCE_TAG,
    Document,
    DocumentChanging,
    DocumentError,
    DocumentGone,
    FileStat,
    RawDocument,
    ScanResult,
    SourceError,
)
from rag_assets.sources.documents import document_from_raw, validate_doc_id
from rag_assets.sources.globs import GlobMatcher
from rag_assets.sources.metadata import DEFAULT_MAX_METADATA_BYTES

# Content types read as text (the formats of today: Markdown, reST, plain text). Generic types are
# what most uploaders send for a .md file; anything else names a format no converter reads yet.
_GENERIC_TYPES = frozenset(
    {
        "",
        "application/octet-stream",
        "binary/octet-stream",
        "application/json",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/markdown",
        "application/x-markdown",
        "application/x-rst",
    }
)
_MISSING_BUCKET = frozenset({"NoSuchBucket"})
_DENIED = frozenset(
    {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
     "InvalidToken", "AccountProblem", "403"}
)


def is_text_type(content_type: str | None) -> bool:
    """True for a content type this source reads as text (``text/*`` or a generic type)."""
    base = (content_type or "").split(";", 1)[0].strip().lower()
    return base.startswith("text/") or base in _GENERIC_TYPES


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix`` parsed: the prefix is a folder (``""`` or ending in ``/``)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        rest = uri[5:]
        bucket, _, prefix = rest.partition("/")
        if not bucket or any(c in bucket for c in " \\?#"):
            raise ValueError(f"{uri!r} names no valid bucket: use s3://bucket or s3://bucket/prefix")
        prefix = prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return cls(bucket, prefix)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _seconds_ns(t: datetime) -> int:
    """LastModified as nanoseconds, floored to the second (listing and GET agree only there)."""
    return int(t.timestamp()) * 1_000_000_000


def _token(etag: str | None, version_id: str | None, versioned: bool) -> str:
    etag = (etag or "").strip('"')
    if versioned and version_id and version_id != "null":
        return f"{etag}@{version_id}"
    return etag


def _fast_timestamp(value):
    """ISO 8601 timestamps with ``Z`` (every listing entry's LastModified) by the standard library;
    anything else by botocore's own parser. botocore's default (dateutil) parser was about a third
    of the client's CPU time per listing page (benchmarks/s3_listing.py)."""
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    if isinstance(value, str) and value.endswith("Z") and "T" in value:
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    return DEFAULT_TIMESTAMP_PARSER(value)


def make_s3_client(max_attempts: int = 10, pool: int = 16):
    """A boto3 S3 client from the standard configuration chain, with standard-mode retries."""
    import boto3
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_fast_timestamp)
    cfg = Config(retries={"mode": "standard", "max_attempts": max_attempts}, max_pool_connections=max(10, pool))
    return boto3.session.Session(botocore_session=session).client("s3", config=cfg)


class S3Source:
    """Documents are the objects under ``uri`` whose key (relative to the prefix) matches
    ``include`` and not ``exclude``. See the module docstring."""

    name = BOUND_SOURCE_TAG
    kind = "s3"
    # Metadata keys that carry the change token beyond (size, mtime): the manifest stage compares
    # them with the listing (``token_of``) without reading any object.
    token_metadata_keys = ("etag", "version_id")

    converter = None  # a sources.convert.DocumentConverter, set by the stage that reads (it holds a connection)

    def __init__(
        self,
        uri: str,
        include: Iterable[str] = ("**/*",),
        exclude: Iterable[str] = (),
        max_doc_bytes: int = 10 * 1024 * 1024,
        max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
        *,
        get_concurrency: int = 16,
        max_attempts: int = 10,
        client=None,
    ):
        self.location = S3Location.parse(uri)
        self.include = GlobMatcher(include)
        exclude = list(exclude)
        self.exclude = GlobMatcher(exclude) if exclude else None
        self.max_doc_bytes = max_doc_bytes
        self.max_metadata_bytes = max_metadata_bytes
        self.get_concurrency = max(1, get_concurrency)
        self._client = client
        self._max_attempts = max_attempts
        self._versioned: bool | None = None

    # ---- the interface ------------------------------------------------------------------------

    def describe(self) -> str:
        return self.location.uri

    @property
    def client(self):
        if self._client is None:
            self._client = make_s3_client(self._max_attempts, self.get_concurrency)
        return self._client

    def token_of(self, etag: str | None, version_id: str | None) -> str:
        """The change token of an object known by its ETag and version id (as stored in metadata)."""
        return _token(etag, version_id, self.versioned)

    @property
    def versioned(self) -> bool:
        """Whether the bucket has (or had) versioning on: one GetBucketVersioning per source object.

        A missing bucket or an unreachable endpoint is a :class:`SourceError`; any other refusal (a
        role without ``s3:GetBucketVersioning``, a store without the versioning API such as R2)
        means the plain listing (see the module docstring), whose own errors name the bucket.
        """
        if self._versioned is None:
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                status = self.client.get_bucket_versioning(Bucket=self.location.bucket).get("Status")
            except ClientError as e:
                if _code(e) in _MISSING_BUCKET:
                    raise self._source_error(e) from None
                status = None
            except BotoCoreError as e:  # endpoint unreachable, no credentials: one clear error
                raise self._source_error(e) from None
            self._versioned = status in ("Enabled", "Suspended")
        return self._versioned

    def scan(self) -> ScanResult:
        """List the prefix once (paginated) and return each matching key's change token."""
        from botocore.exceptions import BotoCoreError, ClientError

        loc = self.location
        versioned = self.versioned
        stats: dict[str, FileStat] = {}
        errors: list[tuple[str, str]] = []
        try:
            for key, size, modified, etag, version in self._listing(versioned):
                rel = key[len(loc.prefix) :]
                if not rel or rel.endswith("/"):
                    continue  # the prefix itself, or a "folder" placeholder object
                if not self.include.match(rel, posixpath.basename(rel)):
                    continue
                if self.exclude is not None and self.exclude.match(rel, posixpath.basename(rel)):
                    continue
                try:
                    validate_doc_id(rel)
                except DocumentError as e:
                    errors.append((e.doc_id, e.reason))
                    continue
                stats[rel] = FileStat(int(size), _seconds_ns(modified), _token(etag, version, versioned))
        except (ClientError, BotoCoreError) as e:  # one clear error naming the bucket
            raise self._source_error(e) from None
        return ScanResult(stats, errors)

    def read_bytes(self, doc_id: str, expected: FileStat | None = None) -> RawDocument:
        """One GET of the object. ``expected`` (the listing's stat): an object over the size limit is
        refused without a GET; the GET is conditional on the listed ETag, so an object rewritten
        since the listing raises :class:`DocumentChanging` (read on the next run)."""
        from botocore.exceptions import BotoCoreError, ClientError

        loc = self.location
        key = loc.prefix + doc_id
        if expected is not None and expected.size > self.max_doc_bytes:
            raise DocumentError(
                doc_id, f"document too large ({expected.size} bytes > RAG_MAX_DOC_BYTES={self.max_doc_bytes})"
            )
        kw = {"Bucket": loc.bucket, "Key": key}
        if expected is not None and expected.token:
            kw["IfMatch"] = '"' + expected.token.split("@", 1)[0] + '"'
        try:
            resp = self.client.get_object(**kw)
        except ClientError as e:
            code = _code(e)
            if code in ("NoSuchKey", "404"):
                raise DocumentGone(doc_id) from None
            if code in ("PreconditionFailed", "412"):
                raise DocumentChanging(doc_id, "rewritten since the listing; read on the next run") from None
            if code in _MISSING_BUCKET:
                raise self._source_error(e) from None
            raise DocumentError(doc_id, f"cannot read {loc.uri}{doc_id}: {code} {_message(e)}") from None
        except BotoCoreError as e:  # a connection error after the retries: this document only
            raise DocumentError(doc_id, f"cannot read {loc.uri}{doc_id}: {e}") from None
        body = resp["Body"]
        try:
            size = int(resp.get("ContentLength") or 0)
            if size > self.max_doc_bytes:
                raise DocumentError(
                    doc_id, f"document too large ({size} bytes > RAG_MAX_DOC_BYTES={self.max_doc_bytes})"
                )
            content_type = resp.get("ContentType")
            from rag_assets.formats.registry import format_for

            if not is_text_type(content_type) and format_for(doc_id, content_type) is None:
                raise DocumentError(
                    doc_id, f"content type {content_type} is not a text format this source reads; skipped"
                )
            try:
                data = body.read(self.max_doc_bytes + 1)
            except (BotoCoreError, OSError) as e:  # the connection broke mid-body: this document only
                raise DocumentError(doc_id, f"cannot read {loc.uri}{doc_id}: {e}") from None
        finally:
            body.close()
        if len(data) > self.max_doc_bytes:
            raise DocumentError(doc_id, f"document too large (> RAG_MAX_DOC_BYTES={self.max_doc_bytes})")
        version = resp.get("VersionId")
        etag = (resp.get("ETag") or "").strip('"')
        stat = FileStat(len(data), _seconds_ns(resp["LastModified"]), self.token_of(etag, version))
        meta = {
            "uri": f"{loc.uri}{doc_id}",
            "etag": etag,
            "version_id": version if version and version != "null" else None,
            "content_type": content_type,
            "user_metadata": dict(resp.get("Metadata") or {}),
        }
        return RawDocument(doc_id, data, content_type, stat, meta)

    def read(self, doc_id: str, expected: FileStat | None = None) -> Document:
        raw = self.read_bytes(doc_id, expected)
        if self.converter is not None:  # PDF, Office, HTML: Markdown through the parse cache
            raw = self.converter.to_text(raw)
        return document_from_raw(raw, self.max_doc_bytes, self.max_metadata_bytes)

    def read_many(
        self, items: Iterable[tuple[str, FileStat | None]]
    ) -> Iterator[tuple[str, Document | DocumentError | DocumentGone]]:
        """Read documents with at most ``get_concurrency`` GETs in flight, in the order given;
        each result is the document or the per-document exception (a :class:`SourceError` raises)."""
        items = list(items)

        def one(item: tuple[str, FileStat | None]):
            try:
                return item[0], self.read(*item)
            except (DocumentError, DocumentGone) as e:
                return item[0], e

        if len(items) <= 1 or self.get_concurrency == 1:
            yield from map(one, items)
            return
        with ThreadPoolExecutor(max_workers=min(self.get_concurrency, len(items))) as pool:
            yield from pool.map(one, items)

    # ---- internals -------------------------------------------------------------------------------

    def _listing(self, versioned: bool) -> Iterator[tuple[str, int, datetime, str, str | None]]:
        """(key, size, LastModified, ETag, VersionId) of the latest version of every key."""
        loc = self.location
        if not versioned:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix)
            for page in pages:
                for o in page.get("Contents") or ():
                    yield o["Key"], o["Size"], o["LastModified"], o.get("ETag", ""), None
            return
        pages = self.client.get_paginator("list_object_versions").paginate(Bucket=loc.bucket, Prefix=loc.prefix)
        for page in pages:
            # a key whose latest version is a delete marker has no IsLatest entry in Versions: deleted
            for o in page.get("Versions") or ():
                if o.get("IsLatest"):
                    yield o["Key"], o["Size"], o["LastModified"], o.get("ETag", ""), o.get("VersionId")

    def _source_error(self, e: BaseException) -> SourceError:
        loc = self.location
        code = _code(e) if hasattr(e, "response") else ""
        if code in _MISSING_BUCKET:
            return SourceError(f"S3 bucket {loc.bucket!r} does not exist (source {loc.uri})")
        if code in _DENIED:
            return SourceError(
                f"access to S3 bucket {loc.bucket!r} denied ({code}: {_message(e)}) for source {loc.uri}: "
                "check the credentials (AWS_* variables, profile or role) and the bucket policy"
            )
        if code:
            return SourceError(f"cannot list S3 bucket {loc.bucket!r} (source {loc.uri}): {code} {_message(e)}")
        return SourceError(f"cannot reach S3 bucket {loc.bucket!r} (source {loc.uri}): {e}")


def _code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _message(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Message", "")) or str(e)
