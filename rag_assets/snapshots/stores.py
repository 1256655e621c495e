"""Where snapshots live: a local folder or an S3 (or S3-compatible) bucket, behind one small interface.

The snapshot logic only ever calls :class:`SnapshotStore`'s five operations (``put_if_absent``,
``get``, ``exists``, ``list``, ``delete``), so the same code snapshots to a folder under
``RAG_HOME`` or to ``s3://bucket/prefix``. Every key is checked against the snapshot layout's
grammar (:func:`rag_assets.snapshots.layout.check_key`) before any I/O, in both implementations.

Folder writes are atomic: the bytes go to a temporary file in the destination directory, are
fsynced, then linked into place (``link`` fails if the name exists, so "if absent" holds even
against a concurrent writer; ``rename`` where links are unsupported). The directory entries are
made durable by ``flush()`` (one fsync per directory instead of one per object), which a snapshot
calls after its objects and again after its record.

S3 goes through boto3 with its standard configuration chain (credentials, region,
``AWS_ENDPOINT_URL`` for S3-compatible stores), retries with botocore's ``standard``/``adaptive``
mode (throttling and 5xx are retried with backoff), multipart uploads above a threshold
(``TransferConfig`` + ``upload_fileobj``), and optional server-side encryption.

How a store transfers is a :class:`StoreConfig` (parallel transfers, encryption, retries, multipart
size), passed in explicitly; :func:`store_for_settings` builds it from ``Settings``
(``RAG_SNAPSHOT_CONCURRENCY``, ``RAG_SNAPSHOT_SSE``, ``RAG_SNAPSHOT_KMS_KEY_ID``,
``RAG_SNAPSHOT_S3_RETRY_MODE``, ``RAG_SNAPSHOT_S3_MAX_ATTEMPTS``, ``RAG_SNAPSHOT_MULTIPART_MB``).
Nothing here reads the environment.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from rag_assets.settings import Settings, check_snapshot_transfer
from rag_assets.snapshots.layout import KEY_RE, SnapshotError, check_key

_BUCKET_RE = re.compile(r"(?!xn--)(?!.*\.\.)(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_SEG_RE = re.compile(r"[0-9A-Za-z!_.*'()=+,-]+")


@dataclass(frozen=True)
class StoreConfig:
    """How a store transfers objects; the defaults are the ``Settings`` defaults.

    Passed explicitly (built from ``Settings`` by :func:`store_for_settings`) so a store never
    reads the environment; checked on construction by ``settings.check_snapshot_transfer``,
    whose errors name the ``RAG_SNAPSHOT_*`` variable.
    """

    concurrency: int = 8  # parallel object transfers (create's uploads, restore's downloads)
    sse: str | None = None  # S3 server-side encryption: "AES256" or "aws:kms"; None: the bucket's default
    kms_key_id: str | None = None  # the KMS key for "aws:kms"; None: the AWS-managed key
    s3_retry_mode: str = "standard"  # botocore retry mode: "standard" or "adaptive"
    s3_max_attempts: int = 10  # total attempts per S3 request
    multipart_mb: int = 64  # multipart threshold and part size in MiB

    def __post_init__(self) -> None:
        check_snapshot_transfer(
            concurrency=self.concurrency,
            sse=self.sse,
            kms_key_id=self.kms_key_id,
            s3_retry_mode=self.s3_retry_mode,
            s3_max_attempts=self.s3_max_attempts,
            multipart_mb=self.multipart_mb,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreConfig:
        return cls(
            concurrency=settings.snapshot_concurrency,
            sse=settings.snapshot_sse,
            kms_key_id=settings.snapshot_kms_key_id,
            s3_retry_mode=settings.snapshot_s3_retry_mode,
            s3_max_attempts=settings.snapshot_s3_max_attempts,
            multipart_mb=settings.snapshot_multipart_mb,
        )


class SnapshotStore(ABC):
    """A flat key → bytes store. Keys are checked by :func:`check_key` before any I/O."""

    uri: str
    config: StoreConfig = StoreConfig()

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes, *, known_absent: bool = False) -> bool:
        """Store ``data`` under ``key`` unless the key exists. Returns True if it was written.

        ``known_absent``: the caller just listed the store and the key was not there, so a
        store may skip its existence probe (content-addressed keys make a racing duplicate
        write harmless: it writes the same bytes).
        """

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`SnapshotError` naming the key if it is missing."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> dict[str, int]:
        """Keys under ``prefix`` (``objects/``, ``snapshots/``, ``pending/``) with their sizes in bytes."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it is already gone)."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make every completed write durable (called before a snapshot record is written)."""

    def delete_many(self, keys: Iterable[str]) -> int:
        n = 0
        for k in keys:
            self.delete(k)
            n += 1
        return n

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _check_prefix(prefix: str) -> str:
    if prefix not in ("objects/", "snapshots/", "pending/"):
        raise SnapshotError(f"invalid listing prefix {prefix!r}")
    return prefix


class FolderStore(SnapshotStore):
    """Snapshots in a local folder (the embedded default: ``RAG_HOME/snapshots``)."""

    def __init__(self, root: Path | str, *, config: StoreConfig | None = None):
        self.config = config or StoreConfig()
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)
        self._dirty: set[Path] = set()
        self._lock = threading.Lock()
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise SnapshotError(
                f"snapshot folder {self.root}: cannot create it ({e.strerror or e})"
            ) from None
        if not self.root.is_dir():
            raise SnapshotError(f"snapshot folder {self.root} is not a directory")

    def _path(self, key: str) -> Path:
        p = (self.root / check_key(key)).resolve()
        if not p.is_relative_to(self.root):  # defence in depth: check_key already forbids this
            raise SnapshotError(f"object key {key!r} resolves outside {self.root}")
        return p

    def put_if_absent(self, key: str, data: bytes, *, known_absent: bool = False) -> bool:
        path = self._path(key)
        if path.exists():
            return False
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            # Owner-only: a snapshot holds every document's text and metadata (ACLs included).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # atomic, and fails if another writer got there first
                written = True
            except FileExistsError:
                written = False
            except OSError:  # no hard links on this filesystem
                os.replace(tmp, path)
                written = True
        except OSError as e:
            raise SnapshotError(
                f"snapshot folder {self.root}: cannot write {key} ({e.strerror or e})"
            ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if written:  # the new name is made durable by flush() (one fsync per directory, not per file)
            with self._lock:
                self._dirty.add(path.parent)
        return written

    def flush(self) -> None:
        with self._lock:
            dirs, self._dirty = self._dirty, set()
        for d in sorted(dirs):
            _fsync_dir(d)
            if d.parent != self.root:
                _fsync_dir(d.parent)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise SnapshotError(f"{key}: missing from snapshot folder {self.root}") from None
        except OSError as e:
            raise SnapshotError(f"{key}: cannot read from {self.root} ({e.strerror or e})") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> dict[str, int]:
        base = self.root / _check_prefix(prefix)
        out: dict[str, int] = {}
        if not base.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in files:
                if f.startswith(".tmp-"):
                    continue
                key = f"{rel}/{f}"
                if KEY_RE.fullmatch(key):
                    try:
                        out[key] = os.stat(os.path.join(dirpath, f)).st_size
                    except FileNotFoundError:
                        continue
        return out

    def delete(self, key: str) -> None:
        self.delete_many([key])

    def delete_many(self, keys: Iterable[str]) -> int:
        paths = [self._path(k) for k in keys]  # all keys are checked before anything is removed
        dirs = set()
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            dirs.add(path.parent)
        for d in sorted(dirs):
            _fsync_dir(d)
        return len(paths)

    def stale_temp_files(self, older_than_s: float) -> list[Path]:
        """Leftovers of interrupted writes (removed by prune)."""
        now = time.time()
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if f.startswith(".tmp-"):
                    p = Path(dirpath) / f
                    try:
                        if now - p.stat().st_mtime > older_than_s:
                            out.append(p)
                    except FileNotFoundError:
                        pass
        return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3Store(SnapshotStore):
    """Snapshots under ``s3://bucket/prefix`` (AWS S3 or any S3-compatible store)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        check: bool = True,
        config: StoreConfig | None = None,
    ):
        self.config = config or StoreConfig()
        if not _BUCKET_RE.fullmatch(bucket or ""):
            raise SnapshotError(f"invalid S3 bucket name {bucket!r}")
        segs = [s for s in prefix.split("/") if s]
        for s in segs:
            if s in (".", "..") or not _PREFIX_SEG_RE.fullmatch(s):
                raise SnapshotError(f"invalid S3 prefix {prefix!r}: segment {s!r}")
        self.bucket = bucket
        self.prefix = "/".join(segs) + "/" if segs else ""
        self.uri = f"s3://{bucket}/{self.prefix}"
        self.sse = self.config.sse
        self.kms_key_id = self.config.kms_key_id
        self.client = client or self._make_client(self.config)
        part = self.config.multipart_mb * 1024 * 1024
        from boto3.s3.transfer import TransferConfig

        self.transfer_config = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=4, use_threads=True
        )
        if check:
            self._check_bucket()

    @staticmethod
    def _make_client(config: StoreConfig):
        import boto3
        from botocore.config import Config

        cfg = Config(
            retries={"mode": config.s3_retry_mode, "total_max_attempts": config.s3_max_attempts},
            max_pool_connections=max(10, config.concurrency * 2),
            connect_timeout=10,
            read_timeout=120,
        )
        return boto3.session.Session().client("s3", config=cfg)

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _error(self, e: Exception, what: str) -> SnapshotError:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and what == "bucket"):
                return SnapshotError(f"S3 bucket {self.bucket!r} does not exist ({self.uri})")
            if (
                code
                in (
                    "AccessDenied",
                    "403",
                    "Forbidden",
                    "InvalidAccessKeyId",
                    "SignatureDoesNotMatch",
                    "AllAccessDisabled",
                    "KMS.AccessDeniedException",
                )
                or status == 403
            ):
                return SnapshotError(
                    f"S3 bucket {self.bucket!r}: access denied for {what} ({code}); check the credentials "
                    "and the bucket policy"
                )
            msg = err.get("Message") or code
            return SnapshotError(f"S3 bucket {self.bucket!r}: {what} failed: {code} {msg}".strip())
        if isinstance(e, NoCredentialsError):
            return SnapshotError(
                f"S3 bucket {self.bucket!r}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, a profile or an instance role)"
            )
        if isinstance(e, BotoCoreError):
            return SnapshotError(f"S3 bucket {self.bucket!r}: {what} failed: {e}")
        return SnapshotError(f"S3 bucket {self.bucket!r}: {what} failed: {e}")

    def _check_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "bucket") from None

    def _extra(self) -> dict:
        extra: dict = {}
        if self.sse:
            extra["ServerSideEncryption"] = self.sse
            if self.kms_key_id:
                extra["SSEKMSKeyId"] = self.kms_key_id
        return extra

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(e, f"HEAD {key}") from None
        except BotoCoreError as e:
            raise self._error(e, f"HEAD {key}") from None

    def put_if_absent(self, key: str, data: bytes, *, known_absent: bool = False) -> bool:
        if not known_absent and self.exists(key):
            return False
        self._put(key, data)
        return True

    def _put(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        extra = self._extra()
        extra["ContentType"] = (
            "application/json" if key.endswith(".json") else "application/vnd.apache.parquet"
        )
        try:
            if len(data) >= self.transfer_config.multipart_threshold:
                self.client.upload_fileobj(
                    io.BytesIO(data), self.bucket, self._k(key), ExtraArgs=extra, Config=self.transfer_config
                )
            else:
                self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **extra)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, f"PUT {key}") from None

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError, ResponseStreamingError

        for attempt in range(3):
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
                return r["Body"].read()
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                    raise SnapshotError(f"{key}: missing from {self.uri}") from None
                raise self._error(e, f"GET {key}") from None
            except ResponseStreamingError as e:  # the body broke off mid-read: not retried by botocore
                if attempt == 2:
                    raise self._error(e, f"GET {key}") from None
            except BotoCoreError as e:
                raise self._error(e, f"GET {key}") from None
        raise AssertionError("unreachable")

    def list(self, prefix: str) -> dict[str, int]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self.prefix + _check_prefix(prefix)
        out: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(self.prefix) :]
                    if KEY_RE.fullmatch(key):
                        out[key] = int(obj["Size"])
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, f"LIST {prefix}") from None
        return out

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, f"DELETE {key}") from None

    def delete_many(self, keys: Iterable[str]) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        keys = [self._k(k) for k in keys]
        n = 0
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            try:
                r = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except (ClientError, BotoCoreError) as e:
                raise self._error(e, "DELETE objects") from None
            errs = r.get("Errors") or []
            if errs:
                first = errs[0]
                raise SnapshotError(
                    f"S3 bucket {self.bucket!r}: could not delete {len(errs)} objects, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
            n += len(batch)
        return n


def open_store(uri: str | os.PathLike, *, client=None, config: StoreConfig | None = None) -> SnapshotStore:
    """The store for ``uri``: ``s3://bucket/prefix``, ``file:///path`` or a plain folder path.

    ``config`` says how it transfers (the defaults when None; :func:`store_for_settings` passes
    the one built from ``Settings``).
    """
    if isinstance(uri, os.PathLike):
        return FolderStore(Path(uri), config=config)
    if not isinstance(uri, str) or not uri or "\x00" in uri:
        raise SnapshotError(f"invalid snapshot URI {uri!r}")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if parts.query or parts.fragment:
            raise SnapshotError(f"invalid snapshot URI {uri!r}: no query or fragment allowed")
        return S3Store(parts.netloc, parts.path, client=client, config=config)
    if scheme == "file":
        return FolderStore(Path(parts.path), config=config)
    if scheme and len(scheme) > 1:  # "C:\..." on Windows has a one-letter "scheme"
        raise SnapshotError(f"unsupported snapshot URI {uri!r}: use a folder path or s3://bucket/prefix")
    return FolderStore(Path(uri), config=config)


def store_for_settings(settings: Settings) -> SnapshotStore:
    """The store ``Settings.snapshot_target`` names (``RAG_SNAPSHOT_URI``, else ``RAG_HOME/snapshots``),
    transferring as the ``RAG_SNAPSHOT_*`` settings say."""
    return open_store(settings.snapshot_target, config=StoreConfig.from_settings(settings))
