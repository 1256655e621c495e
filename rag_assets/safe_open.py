"""Read a file under a root folder without following a symbolic link in any path component.

Why: the scan skips symlinks, but a component swapped for a link between the scan and the read
(``docs/a`` replaced by a link to ``/etc``) was followed by ``open(root / doc_id)``, so a read could
leave the source folder. Here every component is opened relative to its parent's descriptor with
``O_NOFOLLOW`` (``openat``), so no link anywhere on the path is followed, whatever happens between
the calls. The file itself is opened non-blocking (a FIFO swapped in cannot hang the run) and must
be a regular file.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path


class UnsafePath(Exception):
    """A path component is a symbolic link, or the path tries to leave the root."""


class NotRegular(Exception):
    """The path is no longer a regular file (a folder, FIFO or device was put in its place)."""


@dataclass(frozen=True, slots=True)
class ReadResult:
    data: bytes
    size: int
    mtime_ns: int
    size_after: int  # fstat after reading: differs from ``size`` when a writer was busy
    mtime_ns_after: int


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def read_under(root: Path | str, rel: str, max_bytes: int) -> ReadResult:
    """Read at most ``max_bytes + 1`` bytes of ``root/rel``. ``FileNotFoundError`` if it is gone."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"not a canonical relative path: {rel!r}")
    fds: list[int] = []
    try:
        fds.append(os.open(str(root), os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)))
        for comp in parts[:-1]:
            try:
                fds.append(os.open(comp, _DIR_FLAGS, dir_fd=fds[-1]))
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"path component {comp!r} is not a plain folder (a symbolic link?)") from None
                raise
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fds[-1])
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath("the file is a symbolic link") from None
            if e.errno == errno.ENXIO:  # a FIFO with no writer
                raise NotRegular("not a regular file") from None
            raise
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat_mod.S_ISREG(st.st_mode):
                raise NotRegular("not a regular file")
            data = f.read(max_bytes + 1) if st.st_size <= max_bytes else b""
            after = os.fstat(f.fileno())
        return ReadResult(data, st.st_size, st.st_mtime_ns, after.st_size, after.st_mtime_ns)
    finally:
        for d in reversed(fds):
            os.close(d)
