"""Where snapshots live: a local folder or an S3 (or S3-compatible) bucket, behind one small interface.

The snapshot logic (``rag_assets.snapshots``) only ever calls :class:`SnapshotStore`'s five
operations (``put_if_absent``, ``get``, ``exists``, ``list``, ``delete``), so the same code snapshots
to a folder under ``RAG_HOME`` or to ``s3://bucket/prefix``.

Every key is checked against the one grammar the snapshot layout uses (:func:`check_key`) before
any I/O, in both implementations: a tampered record or a hostile id can never make a store read,
write or delete outside its root/prefix (no ``..``, no absolute paths, no other prefix).

Folder writes are atomic: the bytes go to a temporary file in the destination directory, are
fsynced, then linked into place (``link`` fails if the name exists, so "if absent" holds even
against a concurrent writer; ``rename`` where links are unsupported). The directory entries are
made durable by ``flush()`` (one fsync per directory instead of one per object), which a snapshot
calls after its objects and again after its record.

S3 goes through boto3 with its standard configuration chain (credentials, region,
``AWS_ENDPOINT_URL`` for S3-compatible stores), retries with botocore's ``standard``/``adaptive``
mode (throttling and 5xx are retried with backoff), multipart uploads above a threshold
(``TransferConfig`` + ``upload_fileobj``), and optional server-side encryption.
Environment variables read here (candidates for ``Settings``):

- ``RAG_SNAPSHOT_SSE``: ``AES256`` or ``aws:kms`` (unset: the bucket's default encryption)
- ``RAG_SNAPSHOT_KMS_KEY_ID``: the KMS key for ``aws:kms`` (unset: the AWS-managed key)
- ``RAG_SNAPSHOT_S3_RETRY_MODE``: ``standard`` (default) or ``adaptive``
- ``RAG_SNAPSHOT_S3_MAX_ATTEMPTS``: total attempts per request (default 10)
- ``RAG_SNAPSHOT_MULTIPART_MB``: multipart threshold and part size in MiB (default 64)
- ``RAG_SNAPSHOT_CONCURRENCY``: parallel object transfers (default 8)
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit


class SnapshotError(RuntimeError):
    """A snapshot operation failed; the message names the snapshot, object, shard or bucket at fault."""


SNAPSHOT_ID_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")
_SHA = r"[0-9a-f]{64}"
# The only keys a snapshot store ever holds. Objects are content-addressed (sha256 of their bytes).
_KEY_RE = re.compile(
    r"(?:objects/(?P<dir>[0-9a-f]{2})/(?P<sha>" + _SHA + r")\.(?:parquet|json)"
    r"|(?:snapshots|pending)/(?P<id>[0-9A-Za-z][0-9A-Za-z._-]{0,127})\.json)"
)
_BUCKET_RE = re.compile(r"(?!xn--)(?!.*\.\.)(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_SEG_RE = re.compile(r"[0-9A-Za-z!_.*'()=+,-]+")


def check_snapshot_id(snapshot_id: object) -> str:
    """A valid snapshot id, or :class:`SnapshotError` (no path separators, ``..``, NUL, or > 128 chars)."""
    if not isinstance(snapshot_id, str) or not SNAPSHOT_ID_RE.fullmatch(snapshot_id) or ".." in snapshot_id:
        shown = repr(snapshot_id)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise SnapshotError(
            f"invalid snapshot id {shown}: use 1-128 characters [0-9A-Za-z._-], starting with a letter or digit"
        )
    return snapshot_id


def check_key(key: object) -> str:
    """``key`` if it follows the snapshot layout, else :class:`SnapshotError` naming it."""
    if not isinstance(key, str):
        raise SnapshotError(f"invalid object key {key!r}: not a string")
    m = _KEY_RE.fullmatch(key)
    if (
        m is None
        or (m.group("sha") and not m.group("sha").startswith(m.group("dir")))
        or (m.group("id") and ".." in m.group("id"))
    ):
        shown = repr(key)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        raise SnapshotError(f"invalid object key {shown}: outside the snapshot layout")
    return key


def object_key(sha256_hex: str, ext: str) -> str:
    return f"objects/{sha256_hex[:2]}/{sha256_hex}.{ext}"


def key_sha256(key: str) -> str:
    """The sha256 an object key promises (objects are named by the hash of their bytes)."""
    m = _KEY_RE.fullmatch(check_key(key))
    if not m or not m.group("sha"):
        raise SnapshotError(f"{key!r} is not a content-addressed object key")
    return m.group("sha")


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise SnapshotError(f"{name}={raw!r} is not an integer") from None
    if not lo <= v <= hi:
        raise SnapshotError(f"{name}={v} is out of range [{lo}, {hi}]")
    return v


def transfer_concurrency() -> int:
    return _env_int("RAG_SNAPSHOT_CONCURRENCY", 8, 1, 256)


class SnapshotStore(ABC):
    """A flat key → bytes store. Keys are checked by :func:`check_key` before any I/O."""

    uri: str

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

    def __init__(self, root: Path | str):
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
                if _KEY_RE.fullmatch(key):
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
        import time

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

    def __init__(self, bucket: str, prefix: str = "", *, client=None, check: bool = True):
        if not _BUCKET_RE.fullmatch(bucket or ""):
            raise SnapshotError(f"invalid S3 bucket name {bucket!r}")
        segs = [s for s in prefix.split("/") if s]
        for s in segs:
            if s in (".", "..") or not _PREFIX_SEG_RE.fullmatch(s):
                raise SnapshotError(f"invalid S3 prefix {prefix!r}: segment {s!r}")
        self.bucket = bucket
        self.prefix = "/".join(segs) + "/" if segs else ""
        self.uri = f"s3://{bucket}/{self.prefix}"
        self.sse = os.environ.get("RAG_SNAPSHOT_SSE") or None
        self.kms_key_id = os.environ.get("RAG_SNAPSHOT_KMS_KEY_ID") or None
        if self.sse not in (None, "AES256", "aws:kms"):
            raise SnapshotError(f"RAG_SNAPSHOT_SSE={self.sse!r}: use 'AES256' or 'aws:kms'")
        if self.kms_key_id and self.sse != "aws:kms":
            raise SnapshotError("RAG_SNAPSHOT_KMS_KEY_ID is set but RAG_SNAPSHOT_SSE is not 'aws:kms'")
        self.client = client or self._make_client()
        part = _env_int("RAG_SNAPSHOT_MULTIPART_MB", 64, 5, 5 * 1024) * 1024 * 1024
        from boto3.s3.transfer import TransferConfig

        self.transfer_config = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=4, use_threads=True
        )
        if check:
            self._check_bucket()

    @staticmethod
    def _make_client():
        import boto3
        from botocore.config import Config

        mode = os.environ.get("RAG_SNAPSHOT_S3_RETRY_MODE") or "standard"
        if mode not in ("standard", "adaptive"):
            raise SnapshotError(f"RAG_SNAPSHOT_S3_RETRY_MODE={mode!r}: use 'standard' or 'adaptive'")
        attempts = _env_int("RAG_SNAPSHOT_S3_MAX_ATTEMPTS", 10, 1, 100)
        conc = transfer_concurrency()
        cfg = Config(
            retries={"mode": mode, "total_max_attempts": attempts},
            max_pool_connections=max(10, conc * 2),
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
                    if _KEY_RE.fullmatch(key):
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


def open_store(uri: str | os.PathLike, *, client=None) -> SnapshotStore:
    """The store for ``uri``: ``s3://bucket/prefix``, ``file:///path`` or a plain folder path."""
    if isinstance(uri, os.PathLike):
        return FolderStore(Path(uri))
    if not isinstance(uri, str) or not uri or "\x00" in uri:
        raise SnapshotError(f"invalid snapshot URI {uri!r}")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if parts.query or parts.fragment:
            raise SnapshotError(f"invalid snapshot URI {uri!r}: no query or fragment allowed")
        return S3Store(parts.netloc, parts.path, client=client)
    if scheme == "file":
        return FolderStore(Path(parts.path))
    if scheme and len(scheme) > 1:  # "C:\..." on Windows has a one-letter "scheme"
        raise SnapshotError(f"unsupported snapshot URI {uri!r}: use a folder path or s3://bucket/prefix")
    return FolderStore(Path(uri))
